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
log=$(mktemp)
# the base's config: without `optimizer` (the decode does not use it; the base refuses the field)
base_config=$(mktemp --suffix=.toml)
trap 'rm -f "$log" "$base_config"' EXIT
grep -v '^optimizer *=' "$config" > "$base_config"
{
echo "HEAD $head, base $base, $config, $RAYON_NUM_THREADS threads"
for r in $(seq 1 "$rounds"); do
  echo "round $r  $(target/release/examples/core_roundtrip)"
  echo "  $base harness: $($wt/target/release/examples/decode_speed "$base_config")"
  echo "  HEAD harness: $(target/release/examples/decode_speed "$config")"
  for q in f32 q8_0; do
    echo "  HEAD bench decode --quant $q: $(target/release/moelab bench decode --config "$config" \
      --prompt-tokens 200 --gen-tokens 256 --reps 5 --quant $q | grep -E 'prefill|decode' | tr '\n' ' ')"
  done
done
} | tee "$log"
# medians over the rounds, and each round's f32 ratio (HEAD's decode over the base's in the
# same round)
awk -v base="$base" '
  function med(a, n,   i, j, t) {
    for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j-1] > a[j]; j--) { t = a[j]; a[j] = a[j-1]; a[j-1] = t }
    return n % 2 ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2
  }
  / harness: / && $1 == base { match($0, /per step [0-9.]+/); bp[++nb] = substr($0, RSTART+9, RLENGTH-9)
    match($0, /tg256 [0-9.]+/); bd[nb] = substr($0, RSTART+6, RLENGTH-6) }
  /--quant f32:/ { match($0, /first token\)/); match($0, /\([0-9.]+ ms to/); ft[++nf] = substr($0, RSTART+1, RLENGTH-7)
    match($0, /tg256: [0-9.]+/); fd[nf] = substr($0, RSTART+7, RLENGTH-7); rr[nf] = fd[nf] / bd[nf] }
  /--quant q8_0:/ { match($0, /tg256: [0-9.]+/); qd[++nq] = substr($0, RSTART+7, RLENGTH-7) }
  END {
    if (!nb || nb != nf || nf != nq) { print "summary: incomplete rounds" > "/dev/stderr"; exit 1 }
    for (i = 1; i <= nf; i++) { rs = rs sprintf(" %.2f", rr[i]) }
    mb = med(bd, nb); mf = med(fd, nf); mq = med(qd, nq); mp = med(bp, nb); mt = med(ft, nf)
    printf "medians of %d rounds: %s decode %.0f tokens/s; HEAD f32 %.0f (%.2fx), q8_0 %.0f (%.2fx)\n", nb, base, mb, mf, mf / mb, mq, mq / mb
    printf "first token (200-token prompt): %s one per step %.1f ms, HEAD batched f32 %.1f ms (%.1fx)\n", base, mp, mt, mp / mt
    printf "per-round f32 ratios:%s\n", rs
  }' "$log"
