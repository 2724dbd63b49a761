#!/usr/bin/env bash
# The distillation recipe behind the numbers in README.md and BENCHMARKS.md (about an hour on
# a 2-core machine: the teacher 28.5 minutes idle, the later stages 28.5 beside builds). Every
# stage is one moelab command; rerunning skips finished stages. The presets train with Muon
# since the twenty-fourth session: an OUT_DIR of an earlier (AdamW) run keeps its finished
# stages, and its unfinished ones refuse to resume under the changed preset; start a new one.
#
#   scripts/distill-recipe.sh [OUT_DIR]        (default: runs/distill)
#
# 1. problems with step-by-step solutions (and the same problems with answers only)
# 2. teacher MoE on the solutions
# 3. teacher answers fresh problems, the verifier keeps the correct traces
# 4. student (< 1/4 of the teacher's active params) on the verified traces
# 5. the same student on answers only, same steps and tokens
# 6. the student on the traces plus the teacher's logits (KD)
# 7. evaluation of all four on the test split (problems disjoint from training by a hash of
#    their prompt; nothing here was tuned on it); results in OUT_DIR/results.md
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/distill}
TEACHER_STEPS=${TEACHER_STEPS:-2500}
STUDENT_STEPS=${STUDENT_STEPS:-2000}
N=${N:-40000}           # training problems for the teacher
PROMPTS=${PROMPTS:-12000} # fresh prompts the teacher answers
EVAL_N=${EVAL_N:-2000}   # test-split problems per model
KD_WEIGHT=${KD_WEIGHT:-0.5}
KD_T=${KD_T:-2}
if [ -z "${MOELAB:-}" ]; then cargo build --release --quiet; fi
M=${MOELAB:-target/release/moelab}  # MOELAB=path runs a copied binary (safe while rebuilding)
mkdir -p "$OUT"
stage() { echo; echo "== $* ($(date +%T))"; }
timed() { /usr/bin/env time -f "%e s" -a -o "$OUT/times.txt" "$@"; }
# train NAME STEPS CMD...: runs CMD (a training command writing $OUT/NAME) unless the run has
# reached STEPS; a run interrupted earlier (crash, Ctrl-C) is continued with --resume.
train() {
    local name=$1 steps=$2; shift 2
    local latest; latest=$(cat "$OUT/$name/latest" 2>/dev/null || true)
    if [ "$latest" = "$(printf 'step-%07d' "$steps")" ]; then return; fi
    echo "$name" >> "$OUT/times.txt"
    if [ -n "$latest" ]; then timed "$@" --resume; else timed "$@"; fi
}

stage "1. data"
[ -f "$OUT/data/meta.json" ] || $M prepare --task all --n "$N" --seed 1 --out "$OUT/data"
[ -f "$OUT/data-answers/meta.json" ] || $M prepare --task all --n "$N" --seed 1 --no-reasoning \
    --tokenizer "$OUT/data/tokenizer.json" --out "$OUT/data-answers"

stage "2. teacher ($TEACHER_STEPS steps)"
train teacher "$TEACHER_STEPS" $M train --config teacher --data "$OUT/data" --out "$OUT/teacher" \
    --steps "$TEACHER_STEPS"

stage "3. traces"
[ -s "$OUT/traces.jsonl" ] || { echo "generate" >> "$OUT/times.txt";
    timed $M distill generate --teacher "$OUT/teacher" --task all --n "$PROMPTS" --k 1 \
    --temperature 0 --seed 2 --out "$OUT/traces.jsonl" | tee "$OUT/generate.txt"; }

stage "4. student on verified traces"
train student "$STUDENT_STEPS" $M distill train --config student --traces "$OUT/traces.jsonl" \
    --tokenizer "$OUT/teacher" --out "$OUT/student" --steps "$STUDENT_STEPS"

stage "5. student on answers only"
train student-answers "$STUDENT_STEPS" $M train --config student --data "$OUT/data-answers" \
    --out "$OUT/student-answers" --steps "$STUDENT_STEPS"

stage "6. student on traces + teacher logits (W=$KD_WEIGHT, T=$KD_T)"
train student-kd "$STUDENT_STEPS" $M distill train --config student --traces "$OUT/traces.jsonl" \
    --teacher "$OUT/teacher" --kd-weight "$KD_WEIGHT" --kd-temperature "$KD_T" \
    --out "$OUT/student-kd" --steps "$STUDENT_STEPS"

stage "7. test-split evaluation ($EVAL_N problems, seed 1000, greedy)"
for r in teacher student student-answers student-kd; do
    if [ ! -s "$OUT/eval-$r.txt" ]; then
        $M eval --run "$OUT/$r" --task all --split test --n "$EVAL_N" > "$OUT/eval-$r.txt.tmp"
        mv "$OUT/eval-$r.txt.tmp" "$OUT/eval-$r.txt"
    fi
    cat "$OUT/eval-$r.txt"
done
{
    echo "| model | active params | add | mul | expr | sort | all (95% interval) | multi-step (add, mul, expr) |"
    echo "|---|---|---|---|---|---|---|---|"
    for r in teacher student student-answers student-kd; do
        acc() { awk -v t="$1" '$1 == t && $2 == "all" { print $3 }' "$OUT/eval-$r.txt"; }
        all=$(awk '$1 == "all" { print $2 " (" $3 ", n " $4 ", " $5 " distinct)" }' "$OUT/eval-$r.txt")
        multi=$(awk '($1 == "add" || $1 == "mul" || $1 == "expr") && $2 == "all" { s += $3; n++ } END { printf "%.1f%%", s / n }' "$OUT/eval-$r.txt")
        echo "| $r | $(awk '/active matmul params/ { print $NF }' "$OUT/eval-$r.txt") | $(acc add) | $(acc mul) | $(acc expr) | $(acc sort) | $all | $multi |"
    done
} > "$OUT/results.md"
echo; cat "$OUT/results.md"; echo; cat "$OUT/times.txt"
