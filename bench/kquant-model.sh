#!/usr/bin/env bash
# A Q4_K_M model whose widths are whole K-quant super-blocks, against llama.cpp. SmolLM2's
# width (576) is not a multiple of 256, so llama-quantize makes only its ffn_down K-quant;
# real 1B-and-up models are K-quant nearly throughout. This trains a Llama-shaped model of
# width 512 (8 blocks, 8 heads / 4 KV heads, FFN 1,536, vocab 4,096; 29M parameters) for 30
# steps on Shakespeare (weights away from their init; its quality does not matter here),
# exports it as an f16 GGUF, quantizes it with llama.cpp's own `llama-quantize Q4_K_M`
# (Q4_K and Q6_K matrices, Q6_K head) and runs bench/vs-llamacpp.sh on the file.
#
# Usage: bench/kquant-model.sh [--rounds 5]   (other arguments go to vs-llamacpp.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
dir=target/kquant-model
gguf=$dir/l512.q4_k_m.gguf
if [[ ! -f $gguf ]]; then
  BUILD_ONLY=1 bench/vs-llamacpp.sh
  cmake --build target/llamacpp/build -j "$(nproc)" --target llama-quantize >/dev/null
  cargo build --release -q
  bin=target/release/moelab
  scripts/fetch-shakespeare.sh target/shakespeare >&2
  text=target/shakespeare
  rm -rf "$dir" && mkdir -p "$dir"
  cat > "$dir/llama512.toml" <<'TOML'
[model]
vocab_size = 4096
d_model = 512
n_layers = 8
n_heads = 8
n_kv_heads = 4
max_seq_len = 1024
ffn_hidden = 1536
[train]
batch_size = 4
seq_len = 256
lr = 0.001
steps = 30
warmup_steps = 5
eval_every = 1000
checkpoint_every = 1000
TOML
  $bin prepare --corpus "$text" --out "$dir/data" --vocab-size 4096 >&2
  $bin train --config "$dir/llama512.toml" --data "$dir/data" --out "$dir/run" >&2
  $bin export "$dir/run" --format gguf --dtype f16 --out "$dir/l512.f16.gguf" >&2
  target/llamacpp/build/bin/llama-quantize "$dir/l512.f16.gguf" "$gguf" Q4_K_M >"$dir/quantize.log" 2>&1 \
    || { tail -20 "$dir/quantize.log" >&2; exit 1; }
fi
bench/vs-llamacpp.sh "$@" "$gguf"
