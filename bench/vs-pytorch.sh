#!/usr/bin/env bash
# moelab vs PyTorch eager (and optionally torch.compile): training tokens/s on the same
# config, fp32, same thread count, side by side in one run. Rounds alternate between the two
# so that machine noise hits both alike; the median of each is compared.
#
# Usage: bench/vs-pytorch.sh [--threads 2] [--rounds 3] [--steps 10] [--compile] [CONFIG...]
# Default configs: configs/small-dense.toml configs/small-moe.toml
# Needs PyTorch: uses $TORCH_PYTHON, else a venv in .venv-bench (created with pip on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2 rounds=3 steps=10 compile=0 configs=()
while (($#)); do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --compile) compile=1; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) configs+=("$1"); shift ;;
  esac
done
((${#configs[@]})) || configs=(configs/small-dense.toml configs/small-moe.toml)

py=${TORCH_PYTHON:-}
if [[ -z "$py" ]]; then
  if [[ ! -x .venv-bench/bin/python ]]; then
    echo "creating .venv-bench with PyTorch (large download, once)..." >&2
    python3 -m venv .venv-bench
    .venv-bench/bin/pip install -q torch numpy safetensors
  fi
  py=.venv-bench/bin/python
fi
cargo build --release -q
bin=target/release/moelab
export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads RAYON_NUM_THREADS=$threads

echo "# $(date -u +%F) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, threads=$threads, rounds=$rounds, steps=$steps"
echo "# $("$py" -c 'import torch; print("torch", torch.__version__)'), moelab $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
for cfg in "${configs[@]}"; do
  ours=() theirs=() comp=()
  for ((r = 0; r < rounds; r++)); do
    ours+=("$("$bin" bench train --config "$cfg" --steps "$steps" --json | "$py" -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_s"])')")
    theirs+=("$("$py" reference/bench.py "$cfg" --threads "$threads" --steps "$steps" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_s"])')")
    if ((compile)); then
      comp+=("$("$py" reference/bench.py "$cfg" --threads "$threads" --steps "$steps" --compile | "$py" -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_s"])')")
    fi
  done
  "$py" - "$cfg" "${ours[*]}" "${theirs[*]}" "${comp[*]:-}" <<'PY'
import statistics as st, sys
cfg, ours, theirs, comp = sys.argv[1], *[[float(x) for x in a.split()] for a in sys.argv[2:]]
o, t = st.median(ours), st.median(theirs)
line = f"{cfg}: moelab {o:,.0f} tok/s  pytorch-eager {t:,.0f} tok/s  ratio {o / t:.2f}x"
if comp:
    c = st.median(comp)
    line += f"  torch.compile {c:,.0f} tok/s  ratio {o / c:.2f}x"
print(line + f"   (rounds: moelab {[round(x) for x in ours]}, eager {[round(x) for x in theirs]})")
PY
done
