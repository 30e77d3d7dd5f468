#!/bin/bash
# Train a Chimera draft for SmolLM2-135M-Instruct on one GPU: self-distillation data from the
# target (greedy + SAMPLED_COPIES sampled answers per non-GSM8K prompt, GSM8K_PROMPTS greedy GSM8K
# answers, and a greedy + MAGPIE_SAMPLED sampled answers to each prompt the target writes itself
# out of MAGPIE_SAMPLES samples), training with the target's greedy labels, then the MT-bench
# evaluation (K = 4), written to <draft>/eval.json, and with a tree of TREE_NODES drafts (the
# paper's protocol; built by make-tree on TREE_PROMPTS, never MT-bench), to <draft>/eval_tree.json.
# Every stage resumes where it stopped: rerun the script after an interruption.
#
#   RUN=runs/gpu bash scripts/train_smollm2_gpu.sh
#
# Knobs (environment): RUN, DEVICE, GREEDY (0: no greedy non-GSM8K answers), SAMPLED_COPIES,
# GSM8K_PROMPTS, PROMPT_FILES (more prompt files, one greedy answer each; PROMPT_LIMIT: a seeded
# sample of that many of their prompts, e.g. of chimera_vllm/data/smollm2_written_prompts*.jsonl),
# MAGPIE_SAMPLES, MAGPIE_SAMPLED, MAGPIE_OPENERS (a file of openers that steer the
# target-written requests, e.g. chimera_vllm/data/prompt_openers.txt), MAX_PROMPT_TOKENS, MAX_NEW_TOKENS, GEN_BATCH,
# BASE_DATA (earlier data files to mix in, plain or gzipped), ONLY_DATA (1: stop once the data is
# made), STEPS, BATCH, LR,
# INIT_DRAFT, DRAFT_VOCAB_SIZE (default 8192 from the data; with INIT_DRAFT, default: keep its own),
# HEAD_TYPE (medusa: the Medusa baseline), DRAFT_NAME (the draft's folder in RUN),
# TRAIN_ARGS (more `chimera-vllm train` options, e.g. "--kl-weight 1"), EVAL_PROMPTS, TREE_NODES
# (0: no tree evaluation), TREE_PROMPTS (default: 80 target-written training prompts), PYTHON,
# TARGET_GGUF (the target's GGUF file, or its pieces in order, for a machine without PyPI).
# Drafts that share RUN share its data: several can train at once.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/gpu}
DEVICE=${DEVICE:-cuda}
GREEDY=${GREEDY:-1}
SAMPLED_COPIES=${SAMPLED_COPIES:-16}
SEED=${SEED:-1}
GSM8K_PROMPTS=${GSM8K_PROMPTS:-3000}
read -ra PROMPT_FILES <<< "${PROMPT_FILES:-}"
PROMPT_LIMIT=${PROMPT_LIMIT:-}
MAGPIE_SAMPLES=${MAGPIE_SAMPLES:-0}
MAGPIE_SAMPLED=${MAGPIE_SAMPLED:-1}
MAGPIE_OPENERS=${MAGPIE_OPENERS:-}
MAX_PROMPT_TOKENS=${MAX_PROMPT_TOKENS:-320}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-320}
read -ra BASE_DATA <<< "${BASE_DATA:-}"
for f in ${BASE_DATA[@]+"${BASE_DATA[@]}"}; do
    [ -f "$f" ] || { echo "BASE_DATA: no file $f" >&2; exit 1; }
done
GEN_BATCH=${GEN_BATCH:-1024}
STEPS=${STEPS:-2000}
BATCH=${BATCH:-32}
LR=${LR:-5e-4}
INIT_DRAFT=${INIT_DRAFT:-}
DRAFT_VOCAB_SIZE=${DRAFT_VOCAB_SIZE-$([ -n "$INIT_DRAFT" ] || echo 8192)}
HEAD_TYPE=${HEAD_TYPE:-residual}
read -ra TRAIN_ARGS <<< "${TRAIN_ARGS:-}"
read -ra TARGET_GGUF <<< "${TARGET_GGUF:-}"
DRAFT=$RUN/${DRAFT_NAME:-$([ "$HEAD_TYPE" = medusa ] && echo medusa || echo chimera)}  # the trained draft
EVAL_PROMPTS=${EVAL_PROMPTS:-chimera_vllm/data/mt_bench_questions.jsonl}
TREE_NODES=${TREE_NODES:-64}
TREE_PROMPTS=${TREE_PROMPTS:-}
PYTHON=${PYTHON:-python3}
TARGET=HuggingFaceTB/SmolLM2-135M-Instruct
NON_GSM8K=(chimera_vllm/data/self_instruct_seed_tasks.jsonl chimera_vllm/data/self_instruct_user_oriented.jsonl chimera_vllm/data/humaneval.jsonl.gz)
cli() { HF_HUB_OFFLINE=1 "$PYTHON" -m chimera_vllm.cli "$@"; }
parts=()  # the training data's files
answer() {  # answer OUT PROMPT_FILE... [make-data options]: the target's answers, one per prompt
    local out=$1; shift
    cli make-data --target $TARGET --engine hf --device "$DEVICE" --batch-size "$GEN_BATCH" \
        --max-prompt-tokens "$MAX_PROMPT_TOKENS" --max-new-tokens "$MAX_NEW_TOKENS" --out "$RUN/$out" --prompts "$@"
    parts+=("$RUN/$out")
}
sampled() {  # sampled OUT COPIES PROMPT_FILE...: COPIES sampled answers (T=0.8) per prompt
    local out=$1 copies=$2 files=(); shift 2
    for _ in $(seq "$copies"); do files+=("$@"); done
    answer "$out" "${files[@]}" --temperature 0.8 --seed "$SEED"
}
stage() { echo "== $(date +%T) $*"; }
mkdir -p "$RUN"

stage fetch-target
cli fetch-target smollm2-135m ${TARGET_GGUF[@]+--gguf "${TARGET_GGUF[@]}"}

if [ "$GREEDY" = 1 ]; then
    stage "greedy answers, non-GSM8K prompts"
    answer greedy_nongsm.jsonl "${NON_GSM8K[@]}"
fi
if [ "$SAMPLED_COPIES" -gt 0 ]; then
    stage "sampled answers (T=0.8), $SAMPLED_COPIES per non-GSM8K prompt"
    sampled sampled_nongsm.jsonl "$SAMPLED_COPIES" "${NON_GSM8K[@]}"
fi
if [ "$GSM8K_PROMPTS" -gt 0 ]; then
    stage "greedy answers, $GSM8K_PROMPTS GSM8K prompts"
    answer greedy_gsm8k.jsonl chimera_vllm/data/gsm8k_train.jsonl --limit "$GSM8K_PROMPTS"
fi
if [ ${#PROMPT_FILES[@]} -gt 0 ]; then
    stage "greedy answers, ${PROMPT_FILES[*]}${PROMPT_LIMIT:+ (a sample of $PROMPT_LIMIT prompts)}"
    answer greedy_prompts.jsonl "${PROMPT_FILES[@]}" ${PROMPT_LIMIT:+--limit "$PROMPT_LIMIT"}
fi
if [ "$MAGPIE_SAMPLES" -gt 0 ]; then
    stage "prompts written by the target: $MAGPIE_SAMPLES samples of its user turn"
    cli make-prompts --target $TARGET --device "$DEVICE" --batch-size "$GEN_BATCH" --seed "$SEED" \
        --count "$MAGPIE_SAMPLES" ${MAGPIE_OPENERS:+--openers "$MAGPIE_OPENERS"} --out "$RUN/magpie_prompts.jsonl"
    stage "greedy answers, target-written prompts"
    answer greedy_magpie.jsonl "$RUN/magpie_prompts.jsonl"
    if [ "$MAGPIE_SAMPLED" -gt 0 ]; then
        stage "sampled answers (T=0.8), $MAGPIE_SAMPLED per target-written prompt"
        sampled sampled_magpie.jsonl "$MAGPIE_SAMPLED" "$RUN/magpie_prompts.jsonl"
    fi
fi

if [ ! -s "$RUN/data.jsonl" ]; then
    [ $((${#BASE_DATA[@]} + ${#parts[@]})) -gt 0 ] || { echo "no training data: every data knob is off" >&2; exit 1; }
    gzip -dcf ${BASE_DATA[@]+"${BASE_DATA[@]}"} ${parts[@]+"${parts[@]}"} | shuf --random-source=<(yes) \
        > "$RUN/data.tmp" && mv "$RUN/data.tmp" "$RUN/data.jsonl"
fi
echo "$(wc -l < "$RUN/data.jsonl") training sequences"
[ "${ONLY_DATA:-0}" = 1 ] && exit 0

stage "train ($STEPS steps of batch $BATCH)"
cli train --target $TARGET --data "$RUN/data.jsonl" --out "$DRAFT" ${INIT_DRAFT:+--init-draft "$INIT_DRAFT"} \
    --head-type "$HEAD_TYPE" --labels target ${DRAFT_VOCAB_SIZE:+--draft-vocab-size "$DRAFT_VOCAB_SIZE"} \
    --steps "$STEPS" --batch-size "$BATCH" --lr "$LR" --warmup-steps 50 --save-every 100 --log-every 20 \
    --dtype bfloat16 ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}

stage "evaluate on MT-bench turn 1 (K = 4, float32)"
if [ ! -s "$DRAFT/eval.json" ]; then
    cli eval --target $TARGET --draft "$DRAFT" --prompts "$EVAL_PROMPTS" \
        --num-speculative-tokens 4 --device "$DEVICE" --batch-size 80 --json > "$DRAFT/eval.tmp"
    mv "$DRAFT/eval.tmp" "$DRAFT/eval.json"
fi
cat "$DRAFT/eval.json"

if [ "$TREE_NODES" -gt 0 ] && [ ! -s "$DRAFT/eval_tree.json" ]; then
    stage "evaluate with a tree of $TREE_NODES drafts (built on training prompts)"
    if [ -z "$TREE_PROMPTS" ]; then
        TREE_PROMPTS=$RUN/tree_prompts.jsonl
        head -80 chimera_vllm/data/smollm2_written_prompts.jsonl > "$TREE_PROMPTS"
    fi
    cli make-tree --target $TARGET --draft "$DRAFT" --prompts "$TREE_PROMPTS" --nodes "$TREE_NODES" \
        --device "$DEVICE" --batch-size 80 --out "$DRAFT/tree.json"
    cli eval --target $TARGET --draft "$DRAFT" --prompts "$EVAL_PROMPTS" --tree "$DRAFT/tree.json" \
        --device "$DEVICE" --batch-size 80 --json > "$DRAFT/eval_tree.tmp"
    mv "$DRAFT/eval_tree.tmp" "$DRAFT/eval_tree.json"
fi
[ -s "$DRAFT/eval_tree.json" ] && cat "$DRAFT/eval_tree.json"
stage done
