#!/usr/bin/env bash
# Finetune a pretrained BERT on MNLI on one node of 8 GPUs (Megatron-LM's example, our flags).
#
#   PRETRAINED_CHECKPOINT=checkpoints/bert_345m GLUE_DIR=data/glue \
#       examples/finetune_mnli_distributed.sh
#   TP_SIZE=2 examples/finetune_mnli_distributed.sh      # TP 2 x data parallelism 4
#   examples/finetune_mnli_distributed.sh --epochs 1    # flags given here win
#
# The model's shape (layers, hidden size, heads, positions, vocabulary) and the tokenizer come
# from the pretrained checkpoint; the checkpoint may have any tensor-parallel size (it is
# resharded as it loads). Dev accuracy on dev_matched and dev_mismatched is printed after every
# epoch and every EVAL_INTERVAL iterations; the best model goes to CHECKPOINT_PATH/best and the
# metrics to CHECKPOINT_PATH/finetune_summary.json. See docs/finetuning.md.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

GLUE_DIR="${GLUE_DIR:-$REPO_ROOT/data/glue}"
TRAIN_DATA="${TRAIN_DATA:-$GLUE_DIR/MNLI/train.tsv}"
VALID_DATA="${VALID_DATA:-$GLUE_DIR/MNLI/dev_matched.tsv $GLUE_DIR/MNLI/dev_mismatched.tsv}"
PRETRAINED_CHECKPOINT="${PRETRAINED_CHECKPOINT:-$REPO_ROOT/checkpoints/bert_345m}"
CHECKPOINT_PATH="${CHECKPOINT_PATH:-$REPO_ROOT/checkpoints/bert_345m_mnli}"
VOCAB_FILE="${VOCAB_FILE:-}"   # empty: the checkpoint's vocabulary file
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
TP_SIZE="${TP_SIZE:-1}"
MASTER_PORT="${MASTER_PORT:-6000}"
EVAL_INTERVAL="${EVAL_INTERVAL:-5000}"

read -r -a VALID_DATA_ARGS <<< "$VALID_DATA"
for item in "$TRAIN_DATA" "${VALID_DATA_ARGS[@]}"; do
    if [[ ! -f "$item" ]]; then
        echo "finetune_mnli_distributed.sh: $item does not exist (set GLUE_DIR)" >&2
        exit 1
    fi
done

LAUNCH_ARGS=(
    --nproc_per_node "$GPUS_PER_NODE"
    --nnodes 1
    --node_rank 0
    --master_addr localhost
    --master_port "$MASTER_PORT"
)

TASK_ARGS=(
    --task MNLI
    --train-data "$TRAIN_DATA"
    --valid-data "${VALID_DATA_ARGS[@]}"
    --pretrained-checkpoint "$PRETRAINED_CHECKPOINT"
    --seq-length 512
)
if [[ -n "$VOCAB_FILE" ]]; then
    TASK_ARGS+=(--vocab-file "$VOCAB_FILE")
fi

PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP_SIZE"
    --distributed-backend nccl
)

# 5 epochs of 8 samples per rank per step (64 per step on 8 GPUs at TP 1), AdamW 5e-5 with a
# linear warm-up over 6.5% of the steps, then linear decay to 0; Megatron-LM's MNLI recipe.
TRAINING_ARGS=(
    --epochs 5
    --micro-batch-size 8
    --lr 5.0e-5
    --lr-decay-style linear
    --lr-warmup-fraction 0.065
    --weight-decay 1.0e-1
    --clip-grad 1.0
    --hidden-dropout 0.1
    --attention-dropout 0.1
    --bf16
)

# Resume from CHECKPOINT_PATH if a previous run saved there; otherwise start from the
# pretrained checkpoint.
OUTPUT_ARGS=(
    --save "$CHECKPOINT_PATH"
    --load "$CHECKPOINT_PATH"
    --save-interval 5000
    --log-interval 100
    --eval-interval "$EVAL_INTERVAL"
    --seed 1234
)

exec torchrun "${LAUNCH_ARGS[@]}" "$REPO_ROOT/tasks/main.py" \
    "${TASK_ARGS[@]}" \
    "${PARALLEL_ARGS[@]}" \
    "${TRAINING_ARGS[@]}" \
    "${OUTPUT_ARGS[@]}" \
    "$@"
