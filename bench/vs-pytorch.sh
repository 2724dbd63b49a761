#!/usr/bin/env bash
# moelab vs PyTorch: training tokens/s on the same config, same thread count, side by side in
# one run. Peers a user would pick: PyTorch eager fp32, torch.compile fp32, bf16 autocast,
# bf16 autocast + torch.compile; moelab in fp32 and in bf16 (train.precision). Rounds
# alternate between all of them so that machine noise hits each alike; medians are compared.
#
# Usage: bench/vs-pytorch.sh [--threads 2] [--rounds 3] [--steps 10] [--peers LIST] [CONFIG...]
#   --peers  comma-separated subset of eager,compile,bf16,bf16-compile (default: all four)
# Default configs: configs/small-dense.toml configs/small-moe.toml
# Needs PyTorch: uses $TORCH_PYTHON, else a venv in .venv-bench (created with pip on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2 rounds=3 steps=10 peers=eager,compile,bf16,bf16-compile configs=()
while (($#)); do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --peers) peers=$2; shift 2 ;;
    --compile) shift ;; # old flag: compile peers are on by default now
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) configs+=("$1"); shift ;;
  esac
done
((${#configs[@]})) || configs=(configs/small-dense.toml configs/small-moe.toml)
IFS=, read -ra peer_list <<<"$peers"
for p in "${peer_list[@]}"; do
  case "$p" in eager|compile|bf16|bf16-compile) ;; *) echo "unknown peer '$p' (eager, compile, bf16, bf16-compile)" >&2; exit 2 ;; esac
done

source bench/lib.sh
py=$(torch_python)
cargo build --release -q
bin=target/release/moelab
export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads RAYON_NUM_THREADS=$threads
tok() { "$py" -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_s"])'; }

echo "# $(machine_line), threads=$threads, rounds=$rounds, steps=$steps"
echo "# $("$py" -c 'import torch; print("torch", torch.__version__)'), moelab $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
for cfg in "${configs[@]}"; do
  results=()
  for ((r = 0; r < rounds; r++)); do
    results+=("moelab-fp32=$("$bin" bench train --config "$cfg" --steps "$steps" --precision fp32 --json | tok)")
    results+=("moelab-bf16=$("$bin" bench train --config "$cfg" --steps "$steps" --precision bf16 --json | tok)")
    for p in "${peer_list[@]}"; do
      flags=()
      [[ $p == compile || $p == bf16-compile ]] && flags+=(--compile)
      [[ $p == bf16 || $p == bf16-compile ]] && flags+=(--bf16)
      results+=("torch-$p=$("$py" reference/bench.py "$cfg" --threads "$threads" --steps "$steps" "${flags[@]}" | tok)")
    done
  done
  "$py" - "$cfg" "${results[@]}" <<'PY'
import statistics as st, sys
cfg, pairs = sys.argv[1], [a.split("=") for a in sys.argv[2:]]
runs = {}
for name, v in pairs:
    runs.setdefault(name, []).append(float(v))
med = {k: st.median(v) for k, v in runs.items()}
print(f"{cfg}")
for k, v in runs.items():
    print(f"  {k:<20} median {med[k]:>7,.0f} tok/s   rounds {[round(x) for x in v]}")
def ratio(a, b):
    if a in med and b in med:
        print(f"  {a} / {b}: {med[a] / med[b]:.2f}x")
for a, b in [("moelab-fp32", "torch-eager"), ("moelab-fp32", "torch-compile"),
             ("moelab-bf16", "torch-bf16"), ("moelab-bf16", "torch-bf16-compile"),
             ("moelab-bf16", "moelab-fp32")]:
    ratio(a, b)
PY
done
