#!/usr/bin/env bash
# Data-parallel throughput on this machine, side by side in one run: `moelab train` on the
# Shakespeare corpus with small-moe (global batch: 2 micro-batches of 16 x 128 tokens) in
# 1 process x 2 threads, then 2 processes x 1 thread (mpirun), then the cost of the
# canonical-order gradient reduction vs MPI's allreduce. Both training runs must end with
# the same weights hash.
#
# usage: bench/mpi.sh [STEPS]   (needs `cargo build --release --features mpi` and Open MPI)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-30}
bin=target/release/moelab
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ ! -f data/shakespeare-prepared/train.bin ]; then
  scripts/fetch-shakespeare.sh data/shakespeare
  $bin prepare --corpus data/shakespeare --out data/shakespeare-prepared
fi
sed -e 's/^steps = .*/steps = '"$steps"'/' -e 's/^eval_every = .*/eval_every = 0/' \
    -e 's/^checkpoint_every = .*/checkpoint_every = 0/' configs/small-moe.toml > "$work/cfg.toml"
tps() { grep "\"step\":$steps,\"steps\"" "$1/metrics.jsonl" | sed 's/.*"tokens_per_s":\([0-9.]*\).*/\1/'; }
RAYON_NUM_THREADS=2 $bin train --config "$work/cfg.toml" --grad-accum 2 --data data/shakespeare-prepared --out "$work/np1" >/dev/null 2>&1
mpirun -np 2 -x RAYON_NUM_THREADS=1 $bin train --config "$work/cfg.toml" --grad-accum 2 --data data/shakespeare-prepared --out "$work/np2" >/dev/null 2>&1
one=$(tps "$work/np1"); two=$(tps "$work/np2")
echo "small-moe, $steps steps, 2 x 16 x 128 tokens per step"
echo "  1 process  x 2 threads: $one tokens/s"
echo "  2 processes x 1 thread: $two tokens/s  ($(python3 -c "print(f'{$two/$one:.2f}')")x)"
echo "  weights: $($bin hash "$work/np1" | cut -c1-16) / $($bin hash "$work/np2" | cut -c1-16)"
mpirun -np 2 -x RAYON_NUM_THREADS=1 $bin bench reduce --config small-moe
