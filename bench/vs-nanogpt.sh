#!/usr/bin/env bash
# Shakespeare in 10 minutes, as a ratio: nanoGPT's CPU recipe (reference/nanogpt.py, PyTorch,
# character-level, 4 layers, width 128, its LR schedule fitted to the budget) against moelab's
# preset (`moelab train --time-budget`), each given the same wall clock from process start,
# on the same corpus split, one seed after the other, alternating which goes first. Prints
# validation bits per byte for every run, the medians with their spread, and the ratio.
#
# Usage: bench/vs-nanogpt.sh [--budget 10m] [--seeds 1,2,3] [--split test|dev] [--threads 2]
#                            [--config configs/shakespeare.toml] [--peers nanogpt,moelab]
#   --split dev   tune here: only the plays that lie wholly inside the test split's training
#                 text (the test split's validation text is never read)
#   --split test  report here: all 42 plays, the last 10% of the bytes as validation
# Work files (the corpus, prepared data, runs, logs) go to target/vs-nanogpt/.
# Needs PyTorch: uses $TORCH_PYTHON, else a venv in .venv-bench (created with pip on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
budget=10m seeds=1,2,3 split=test threads=2 config=configs/shakespeare.toml peers=nanogpt,moelab
while (($#)); do
  case "$1" in
    --budget) budget=$2; shift 2 ;;
    --seeds) seeds=$2; shift 2 ;;
    --split) split=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --peers) peers=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$split" in test|dev) ;; *) echo "--split must be test or dev" >&2; exit 2 ;; esac
[[ -f $config ]] || config=configs/$config.toml # a preset name
[[ -f $config ]] || { echo "--config: no such file or preset" >&2; exit 2; }
case "$budget" in
  *h) secs=$(awk "BEGIN{print ${budget%h} * 3600}") ;;
  *m) secs=$(awk "BEGIN{print ${budget%m} * 60}") ;;
  *s) secs=${budget%s} ;;
  *) secs=$budget ;;
esac
[[ $secs =~ ^[0-9.]+$ ]] || { echo "--budget: '$budget' is not a duration (e.g. 10m, 90s, 1.5h, 600)" >&2; exit 2; }
IFS=, read -ra seed_list <<<"$seeds"
IFS=, read -ra peer_list <<<"$peers"
for p in "${peer_list[@]}"; do
  case "$p" in nanogpt|moelab) ;; *) echo "unknown peer '$p' (nanogpt, moelab)" >&2; exit 2 ;; esac
done

source bench/lib.sh
py=$(torch_python)
cargo build --release -q
bin=$PWD/target/release/moelab
export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads RAYON_NUM_THREADS=$threads

work=target/vs-nanogpt
mkdir -p "$work"
scripts/fetch-shakespeare.sh "$work/shakespeare" >&2
corpus=$work/shakespeare
if [[ $split == dev ]]; then
  corpus=$work/dev-text
  if [[ ! -d $corpus ]]; then
    rm -rf "$corpus.tmp"
    mkdir -p "$corpus.tmp"
    "$py" reference/nanogpt.py dev-plays --corpus "$work/shakespeare" | while read -r f; do
      ln -sf "$PWD/$f" "$corpus.tmp/"
    done
    mv "$corpus.tmp" "$corpus"
  fi
fi
vocab=$(sed -n 's/^vocab_size *= *\([0-9]*\).*/\1/p' "$config" | head -n 1)
[[ -n $vocab ]] || { echo "$config: no [model] vocab_size" >&2; exit 2; }
data=$work/data-$split-v$vocab
if [[ ! -f $data/meta.json || ! -f $data.seconds ]]; then
  t0=$(date +%s.%N)
  "$bin" prepare --corpus "$corpus" --out "$data" --vocab-size "$vocab" --force >&2
  awk "BEGIN{print $(date +%s.%N) - $t0}" >"$data.seconds"
fi
# nanoGPT encodes its characters inside its budget; moelab's tokenizer training and encoding
# (`moelab prepare`, once per data dir) come off moelab's budget
prep=$(cat "$data.seconds")
moelab_secs=$(awk "BEGIN{print $secs - $prep}")
awk "BEGIN{exit !($moelab_secs > 0)}" || { echo "moelab prepare took $prep s, longer than the budget" >&2; exit 2; }
val_bytes=$(sed -n 's/^ *"val_bytes": *\([0-9]*\).*/\1/p' "$data/meta.json")

echo "# $(machine_line), threads=$threads, budget=$budget, split=$split, seeds=$seeds"
echo "# $("$py" -c 'import torch; print("torch", torch.__version__)'), moelab $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $config"
echo "# moelab prepare took $prep s: moelab trains with --time-budget $moelab_secs"
results=()
run_nanogpt() {
  local seed=$1 log=$work/nanogpt-$split-$1.log
  "$py" reference/nanogpt.py train --corpus "$corpus" --budget "$secs" --seed "$seed" \
    --threads "$threads" 2>"$log" >"$log.json"
  results+=("nanogpt=$(cat "$log.json")")
  # both must be scored on the same text: stop now, not after an hour of runs
  grep -q "\"val_bytes\": $val_bytes," "$log.json" || {
    echo "nanoGPT scored other validation bytes than $data/meta.json's $val_bytes: $(cat "$log.json")" >&2
    exit 1
  }
}
run_moelab() {
  local seed=$1 run=$work/run-$split-$1 t0 t1
  rm -rf "$run"
  t0=$(date +%s.%N)
  "$bin" train --config "$config" --data "$data" --out "$run" --time-budget "$moelab_secs" \
    --seed "$seed" >"$work/moelab-$split-$seed.log" 2>&1
  t1=$(date +%s.%N)
  results+=("moelab=$("$py" - "$run" "$data" "$seed" "$t0" "$t1" <<'PY'
import json, math, sys
run, data, seed, t0, t1 = sys.argv[1:]
evals = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if '"val_loss"' in l]
last, meta = evals[-1], json.load(open(f"{data}/meta.json"))
print(json.dumps({"peer": "moelab", "seed": int(seed), "iters": last["step"],
                  "val_nats_per_token": last["val_loss"], "val_tokens": last["val_tokens"],
                  "val_bytes": meta["val_bytes"],
                  "bits_per_byte": last["val_loss"] / math.log(2) / (meta["val_bytes"] / meta["val_tokens"]),
                  "wall_s": float(t1) - float(t0)}))
PY
)")
}
for ((r = 0; r < ${#seed_list[@]}; r++)); do
  seed=${seed_list[$r]}
  order=("${peer_list[@]}")
  ((r % 2)) && order=($(printf '%s\n' "${peer_list[@]}" | tac))
  for p in "${order[@]}"; do
    "run_$p" "$seed"
    echo "  ${results[-1]}" >&2
  done
done
"$py" - "${results[@]}" <<'PY'
import json, statistics as st, sys
runs = {}
for a in sys.argv[1:]:
    name, js = a.split("=", 1)
    runs.setdefault(name, []).append(json.loads(js))
vb = {r["val_bytes"] for rs in runs.values() for r in rs}
assert len(vb) == 1, f"the peers were scored on different validation texts: {vb} bytes"
print(f"validation: {vb.pop():,} bytes")
med = {}
for name, rs in runs.items():
    bpb = [r["bits_per_byte"] for r in rs]
    med[name] = st.median(bpb)
    per = ", ".join(f"seed {r['seed']}: {r['bits_per_byte']:.4f} ({r['iters']} steps, {r['wall_s']:.0f} s)" for r in rs)
    print(f"  {name:<8} median {med[name]:.4f} bits/byte  spread {min(bpb):.4f}-{max(bpb):.4f}   {per}")
if len(med) == 2:
    ratio = med["moelab"] / med["nanogpt"]
    print(f"  moelab / nanogpt: {ratio:.3f} (target <= 0.86: {'met' if ratio <= 0.86 else 'not met'})")
PY
