#!/usr/bin/env bash
# Training memory and speed by sequence length (issue 15): `moelab bench train` on the
# small-moe preset at batch 1, T = 512 ... 16,384, with the stored-probability attention
# kernel (the (B, H, T, T) probabilities kept for the backward) and the tiled one
# (FlashAttention-2, memory O(B H T)), alternating, 2 threads. Prints a markdown table
# (per-round tokens/s, median ratio tiled/stored, peak RSS) and draws peak memory against T
# as an SVG. Stored is skipped at 16,384 (it would need ~22 GiB).
#
# Usage: bench/long-context.sh [--rounds 3] [--max-t 16384] [--svg docs/long-context/memory.svg]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3 max_t=16384 svg=docs/long-context/memory.svg
while (($#)); do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --max-t) max_t=$2; shift 2 ;;
    --svg) svg=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1" >&2; exit 2 ;;
  esac
done
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
cargo build --release --quiet
out=target/long-context
mkdir -p "$out"
res=$out/results.jsonl
: > "$res"
echo "moelab $(git rev-parse --short HEAD), $RAYON_NUM_THREADS threads, $(lscpu | sed -n 's/^Model name: *//p')"
for t in 512 1024 2048 4096 8192 16384; do
  ((t <= max_t)) || continue
  # long sequences: fewer steps and one round (a step at 16,384 takes most of a minute)
  if ((t <= 2048)); then steps=8 warm=2 n=$rounds; else steps=3 warm=1 n=1; fi
  for r in $(seq 1 "$n"); do
    kernels="stored tiled"
    ((r % 2 == 0)) && kernels="tiled stored"
    for k in $kernels; do
      ((t > 8192)) && [[ $k == stored ]] && continue
      line=$(target/release/moelab bench train --config small-moe --seq-len "$t" --batch-size 1 \
        --steps "$steps" --warmup "$warm" --attention "$k" --json)
      echo "{\"kernel\":\"$k\",\"round\":$r,${line#\{}" >> "$res"
      echo "T $t round $r $k: $(echo "$line" | grep -oE '"tokens_per_s":[0-9.]+' | cut -d: -f2) tokens/s, peak $(echo "$line" | grep -oE '"peak_rss_mib":[0-9.]+' | cut -d: -f2) MiB" >&2
    done
  done
done
mkdir -p "$(dirname "$svg")"
python3 bench/long_context_table.py "$res" "$svg"
