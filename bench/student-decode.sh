#!/usr/bin/env bash
# Small-model single-stream speed against the code before batched prefill and the decode
# kernels of issue 14 (6a1a3d1): the student preset's shape with random weights, 2 threads,
# alternating rounds. Each round prints the core-to-core round trip (the two-thread paths
# depend on it), the base's 200-token prompt fed one token per step and its decode tokens/s
# (crates/model/examples/decode_speed.rs, which only uses Decoder::step, built against the
# base), then HEAD's `moelab bench decode` in f32 and with Q8_0 weights.
#
# Usage: bench/student-decode.sh [--rounds 9] [--base 6a1a3d1] [--config configs/student.toml]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=9 base=6a1a3d1 config=configs/student.toml
while (($#)); do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --base) base=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1" >&2; exit 2 ;;
  esac
done
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
head=$(git rev-parse --short HEAD)
cargo build --release --quiet
cargo build --release --quiet -p model --example decode_speed
cargo build --release --quiet -p kernels --example core_roundtrip
wt=target/student-decode/$base
if [[ ! -x $wt/target/release/examples/decode_speed ]]; then
  rm -rf "$wt"
  mkdir -p target/student-decode
  git worktree prune
  git worktree add --detach --force "$wt" "$base" >/dev/null
  mkdir -p "$wt/crates/model/examples"
  cp crates/model/examples/decode_speed.rs "$wt/crates/model/examples/"
  (cd "$wt" && CARGO_TARGET_DIR=target cargo build --release --quiet -p model --example decode_speed)
fi
echo "HEAD $head, base $base, $config, $RAYON_NUM_THREADS threads"
for r in $(seq 1 "$rounds"); do
  echo "round $r  $(target/release/examples/core_roundtrip)"
  echo "  $base harness: $($wt/target/release/examples/decode_speed "$config")"
  echo "  HEAD harness: $(target/release/examples/decode_speed "$config")"
  for q in f32 q8_0; do
    echo "  HEAD bench decode --quant $q: $(target/release/moelab bench decode --config "$config" \
      --prompt-tokens 200 --gen-tokens 256 --reps 5 --quant $q | grep -E 'prefill|decode' | tr '\n' ' ')"
  done
done
