#!/usr/bin/env bash
# Single-stream decode speed of several moelab binaries (or wrapper scripts), alternating:
# each round runs every binary once in the order given; prints each one's median, min and
# max over the rounds. Copy a build aside (cp target/release/moelab /tmp/moelab-a) before
# changing the code, then compare; an identical copy given twice shows the host's noise.
#
# Usage: bench/decode-ab.sh ROUNDS BIN... (env: CONFIG, default configs/student.toml;
#        QUANT, default f32; RAYON_NUM_THREADS, default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
(($# >= 2)) || { sed -n '2,8p' "$0"; exit 2; }
rounds=$1
shift
# without `optimizer` (decode does not use it; builds before it existed refuse the field)
config=$(mktemp --suffix=.toml)
trap 'rm -f "$config"' EXIT
grep -v '^optimizer *=' "${CONFIG:-configs/student.toml}" > "$config"
declare -A res
for _ in $(seq 1 "$rounds"); do
  for b in "$@"; do
    v=$(RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2} "$b" bench decode --config "$config" \
      --prompt-tokens 0 --gen-tokens 256 --reps 9 --quant "${QUANT:-f32}" 2>&1 |
      grep -oP 'tg256: \K[0-9.]+' || true)
    [[ -n $v ]] || { echo "error: $b bench decode --config ${CONFIG:-configs/student.toml} printed no tg256" >&2; exit 1; }
    res[$b]="${res[$b]:-} $v"
  done
done
for b in "$@"; do
  echo "$b: $(echo ${res[$b]} | tr ' ' '\n' | sort -n |
    awk '{a[NR]=$1} END {printf "median %.0f  min %.0f max %.0f n %d", a[int((NR+1)/2)], a[1], a[NR], NR}')"
done
