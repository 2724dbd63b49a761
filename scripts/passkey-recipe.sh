#!/usr/bin/env bash
# Context extension, measured: a small model trained at T = 512 and extended with YaRN to
# 4,096 by a short fine-tune, both evaluated on passkey retrieval at 512 ... 4,096 tokens.
# The numbers and heatmaps in README.md ("Long context") come from this script (27 minutes
# on 2 cores; docs/long-context/ holds its outputs and stage times). Every stage is one moelab
# command; rerunning skips finished stages.
#
#   scripts/passkey-recipe.sh [OUT_DIR]        (default: runs/passkey)
#
# 1. passkey documents of up to 128, 512 and 4,096 tokens (keys of the train split; the
#    evaluation draws keys of the test split, disjoint by a hash of the key)
# 2. base model: induction (copying the key) learnt at T = 128, then trained at T = 512
# 3. extension: the base's weights at T = 4,096 with YaRN (factor 8 over 512), a short
#    fine-tune (200 steps) on documents of up to 4,096 tokens
# 4. both models on the test split: 4 lengths x 11 depths x N keys; OUT_DIR/*.svg
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/passkey}
N=${N:-20}   # keys per (length, depth) cell
SPLIT=${SPLIT:-test}
if [ -z "${MOELAB:-}" ]; then cargo build --release --quiet; fi
M=${MOELAB:-target/release/moelab}
mkdir -p "$OUT"
stage() { echo; echo "== $* ($(date +%T))"; }
timed() { /usr/bin/env time -f "%e s" -a -o "$OUT/times.txt" "$@"; }
# train NAME CMD...: runs CMD (a training command writing $OUT/NAME) unless the run has
# finished; a run interrupted earlier is continued with --resume.
train() {
    local name=$1; shift
    [ -f "$OUT/$name/done" ] && return
    echo "$name" >> "$OUT/times.txt"
    if [ -f "$OUT/$name/latest" ]; then timed "$@" --resume; else timed "$@"; fi
    touch "$OUT/$name/done"
}

stage "1. data"
[ -f "$OUT/data-128/meta.json" ] || $M prepare --passkey --context 128 --n 40000 --out "$OUT/data-128"
TOK="$OUT/data-128/tokenizer.json"
[ -f "$OUT/data-512/meta.json" ] || $M prepare --passkey --context 512 --n 20000 --tokenizer "$TOK" --out "$OUT/data-512"
[ -f "$OUT/data-4096/meta.json" ] || $M prepare --passkey --context 4096 --n 1000 --tokenizer "$TOK" --out "$OUT/data-4096"

stage "2. base model at T = 128, then 512"
train short $M train --config passkey-128 --data "$OUT/data-128" --out "$OUT/short"
train base $M train --init "$OUT/short" --config passkey-512 --data "$OUT/data-512" --out "$OUT/base"

stage "3. YaRN extension to 4,096"
train yarn $M train --init "$OUT/base" --config passkey-4096-yarn --data "$OUT/data-4096" --out "$OUT/yarn"

stage "4. passkey retrieval, $SPLIT split"
for run in base yarn; do
    [ -f "$OUT/eval-$run.txt" ] && continue
    echo "eval-$run" >> "$OUT/times.txt"
    timed $M eval --run "$OUT/$run" --task passkey --split "$SPLIT" --n "$N" \
        --context 512,1024,2048,4096 --heatmap "$OUT/passkey-$run.svg" \
        --title "$run: passkey retrieval (% of $N keys per cell)" > "$OUT/eval-$run.txt.tmp"
    mv "$OUT/eval-$run.txt.tmp" "$OUT/eval-$run.txt"
done
stage "done"
cat "$OUT/eval-base.txt" "$OUT/eval-yarn.txt"
echo; echo "stage times:"; cat "$OUT/times.txt"
