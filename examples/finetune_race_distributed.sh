#!/usr/bin/env bash
# Finetune a pretrained BERT on RACE on one node of 8 GPUs (Megatron-LM's example, our flags).
#
#   PRETRAINED_CHECKPOINT=checkpoints/bert_345m RACE_DIR=data/RACE \
#       examples/finetune_race_distributed.sh
#   TP_SIZE=2 examples/finetune_race_distributed.sh      # TP 2 x data parallelism 4
#
# RACE_DIR holds RACE as it is distributed: train/, dev/ and test/, each with middle/ and high/
# directories of one-JSON-object .txt files. Each question becomes four sequences
# "[CLS] article [SEP] question+option [SEP]"; accuracy is reported overall and for middle and
# high. The model's shape and tokenizer come from the pretrained checkpoint (any TP size). See
# docs/finetuning.md.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

RACE_DIR="${RACE_DIR:-$REPO_ROOT/data/RACE}"
PRETRAINED_CHECKPOINT="${PRETRAINED_CHECKPOINT:-$REPO_ROOT/checkpoints/bert_345m}"
CHECKPOINT_PATH="${CHECKPOINT_PATH:-$REPO_ROOT/checkpoints/bert_345m_race}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
TP_SIZE="${TP_SIZE:-1}"
MASTER_PORT="${MASTER_PORT:-6000}"

for split in train dev; do
    if [[ ! -d "$RACE_DIR/$split" ]]; then
        echo "finetune_race_distributed.sh: $RACE_DIR/$split does not exist (set RACE_DIR)" >&2
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

# Validation: dev/middle and dev/high, each reported on its own (and dev as a whole).
TASK_ARGS=(
    --task RACE
    --train-data "$RACE_DIR/train"
    --valid-data "$RACE_DIR/dev/middle" "$RACE_DIR/dev/high" "$RACE_DIR/dev"
    --pretrained-checkpoint "$PRETRAINED_CHECKPOINT"
    --seq-length 512
)

PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP_SIZE"
    --distributed-backend nccl
)

# 3 epochs of 4 questions (16 sequences) per rank per step, AdamW 1e-5 with a 6% warm-up;
# Megatron-LM's RACE recipe.
TRAINING_ARGS=(
    --epochs 3
    --micro-batch-size 4
    --lr 1.0e-5
    --lr-decay-style linear
    --lr-warmup-fraction 0.06
    --weight-decay 1.0e-1
    --clip-grad 1.0
    --hidden-dropout 0.1
    --attention-dropout 0.1
    --bf16
)

OUTPUT_ARGS=(
    --save "$CHECKPOINT_PATH"
    --load "$CHECKPOINT_PATH"
    --save-interval 100000
    --log-interval 100
    --eval-interval 1000
    --seed 1234
)

exec torchrun "${LAUNCH_ARGS[@]}" "$REPO_ROOT/tasks/main.py" \
    "${TASK_ARGS[@]}" \
    "${PARALLEL_ARGS[@]}" \
    "${TRAINING_ARGS[@]}" \
    "${OUTPUT_ARGS[@]}" \
    "$@"
