#!/usr/bin/env bash
# The kernels' code paths for CPUs other than this one. Every kernel picks its code at run
# time (AVX-512, AVX2, portable), so on an AVX-512 host the test suite only runs the
# AVX-512 paths: the multiversioned `simd!` functions' AVX2 and portable copies (norms,
# SwiGLU, softmax, flash attention rows, AdamW, Muon, loss) and the matmuls' other kernels
# would ship untested. This runs kernel and model tests, already built by the main suite,
# under QEMU's user-mode emulation of a Haswell (AVX2, FMA, F16C, no AVX-512), of a Sandy
# Bridge (AVX only; the kernel unit tests) and of a Nehalem (no AVX: the portable code);
# each CPU's runs start with a test asserting the features it shows.
# Emulation is slow (AVX2 code about 100x), so the Haswell set is the kernel unit tests and
# the model's finite differences and small equivalences; the Nehalem set adds gradient
# checks, decoding, the PyTorch golden fixtures and Muon; the matmul digest also runs with a
# 12-way L1d laid over sysfs (gemm blocks k by it).
#
# Usage: scripts/test-cpus.sh [LOG]   (appends the test output to LOG; needs qemu-user)
set -euo pipefail
cd "$(dirname "$0")/.."
log=${1:-/dev/null}
if [ "$(uname -m)" != x86_64 ]; then
  echo "== emulated CPUs: skipped (not an x86_64 host)"
  exit 0
fi
command -v qemu-x86_64 >/dev/null || { echo "error: qemu-x86_64 missing (apt-get install qemu-user)"; exit 1; }
# QEMU emulates AVX, AVX2, FMA and F16C from 7.2 on; older ones would fail the CPU check
qv=$(qemu-x86_64 --version | grep -oE '[0-9]+\.[0-9]+' | head -1)
if [ "$(printf '%s\n7.2\n' "$qv" | sort -V | head -1)" != 7.2 ]; then
  echo "error: QEMU $qv emulates no AVX2; the emulated-CPU tests need QEMU 7.2 or newer"
  exit 1
fi
# the test executables of the main suite's build (same features: nothing is rebuilt; a
# build error stops here with cargo's message)
json=$(cargo test --workspace --all-targets --all-features --locked --no-run -q --message-format=json)
mapfile -t exes < <(grep -o '"executable":"[^"]*"' <<<"$json" | cut -d'"' -f4)
exe() {
  local e
  for e in "${exes[@]}"; do
    case "$e" in */deps/"$1"-*) echo "$e"; return ;; esac
  done
  echo "error: no test executable for $1" >&2
  exit 1
}
run() {
  local cpu=$1 expect=$2
  shift 2
  echo "== tests on an emulated $cpu ($expect)"
  local t
  for t in "$@"; do
    local bin
    bin=$(exe "$t")
    # qemu warns about host-only CPUID bits it does not model: noise, not failures
    set +e
    MOELAB_EXPECT_CPU=$expect qemu-x86_64 -cpu "$cpu" "$bin" -q 2> >(grep -v '^qemu-x86_64: warning' >&2) |
      tee -a "$log" | grep -E '^test result|FAILED|panicked' | sed "s|^|  $t: |"
    local status=${PIPESTATUS[0]}
    set -e
    [ "$status" = 0 ] || { echo "error: $t failed on an emulated $cpu"; exit 1; }
  done
}
# each CPU's runs start with the kernels' unit tests, among them cpu_features_are_as_expected
# (the features the emulated CPU shows); a Sandy Bridge (AVX without AVX2) runs only those
run Haswell-v4 "avx2,fma,f16c,-avx512f,-avx512bw,-avx512vnni,-avx512bf16" \
  kernels model fd dropout hf_golden moe_dense_equivalence
run SandyBridge-v2 "avx,-avx2,-fma,-avx512f" kernels
run Nehalem-v2 "-avx,-avx2,-fma,-avx512f" kernels model fd dropout hf_golden moe_dense_equivalence \
  gradcheck decode golden muon
# gemm sizes its k-blocks by the L1d it reads from sysfs (under qemu-user: the host's), not
# CPUID: an AVX2 CPU with a 12-way L1d (Alder and Raptor Lake P-cores) gets 1,024 where the AVX-512
# hosts get 512. `-L` lays a sysfs of such a CPU over the host's, so the matmul digest meets
# that case on any host (matmul_raw's k-blocks keep gemm from seeing it).
echo "== the matmul digest on an emulated Haswell with a 12-way L1d (tests/fixtures/sysfs-l1d-12way)"
set +e
qemu-x86_64 -L tests/fixtures/sysfs-l1d-12way -cpu Haswell-v4 "$(exe kernels)" -q --exact \
  matmul::tests::matmul_bits_are_the_same_on_every_cpu_with_fma 2> >(grep -v '^qemu-x86_64: warning' >&2) |
  tee -a "$log" | grep -E '^test result|FAILED|panicked' | sed "s|^|  kernels: |"
status=${PIPESTATUS[0]}
set -e
[ "$status" = 0 ] || { echo "error: the matmul digest differs with a 12-way L1d"; exit 1; }
