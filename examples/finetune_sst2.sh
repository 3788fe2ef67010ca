#!/usr/bin/env bash
# Finetune a pretrained BERT on SST-2 in one process (one GPU, or the CPU), then write GLUE
# submission predictions for the test file.
#
#   PRETRAINED_CHECKPOINT=runs/demo/checkpoints GLUE_DIR=../shared/data/glue \
#       examples/finetune_sst2.sh                  # the demo checkpoint, on the CPU
#   examples/finetune_sst2.sh --epochs 1 --lr 1e-4   # flags given here win
#
# The model's shape and tokenizer come from the checkpoint. Dev accuracy is printed after every
# epoch; the best model is kept in CHECKPOINT_PATH/best and, when GLUE_DIR/SST-2/test.tsv exists,
# its predictions are written to CHECKPOINT_PATH/predictions/SST-2.tsv ("index<TAB>prediction",
# GLUE's submission layout). See docs/finetuning.md.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

GLUE_DIR="${GLUE_DIR:-$REPO_ROOT/data/glue}"
PRETRAINED_CHECKPOINT="${PRETRAINED_CHECKPOINT:-$REPO_ROOT/runs/demo/checkpoints}"
CHECKPOINT_PATH="${CHECKPOINT_PATH:-$REPO_ROOT/runs/sst2}"
PYTHON="${PYTHON:-python}"
BACKEND="${BACKEND:-gloo}"   # nccl on a GPU

for item in "$GLUE_DIR/SST-2/train.tsv" "$GLUE_DIR/SST-2/dev.tsv"; do
    if [[ ! -f "$item" ]]; then
        echo "finetune_sst2.sh: $item does not exist (set GLUE_DIR)" >&2
        exit 1
    fi
done

PREDICT_ARGS=()
if [[ -f "$GLUE_DIR/SST-2/test.tsv" ]]; then
    PREDICT_ARGS=(--predict --test-data "$GLUE_DIR/SST-2/test.tsv")
fi

# 3 epochs of 32 sentences per step, AdamW 2e-5 with a 10% warm-up, sequences of 128 tokens
# (SST-2 sentences are short). Sequences may be no longer than the checkpoint's positions.
exec "$PYTHON" "$REPO_ROOT/tasks/main.py" \
    --task SST-2 \
    --train-data "$GLUE_DIR/SST-2/train.tsv" \
    --valid-data "$GLUE_DIR/SST-2/dev.tsv" \
    --pretrained-checkpoint "$PRETRAINED_CHECKPOINT" \
    --seq-length 128 \
    --epochs 3 \
    --micro-batch-size 32 \
    --lr 2.0e-5 \
    --lr-decay-style linear \
    --lr-warmup-fraction 0.1 \
    --weight-decay 1.0e-2 \
    --distributed-backend "$BACKEND" \
    --save "$CHECKPOINT_PATH" \
    --log-interval 50 \
    --eval-interval 100000 \
    --seed 1234 \
    "${PREDICT_ARGS[@]}" \
    "$@"
