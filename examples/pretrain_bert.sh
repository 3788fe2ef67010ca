#!/usr/bin/env bash
# Pretrain BERT-345M (24 layers, hidden 1024, 16 heads, sequences of 512) on one GPU.
#
#   DATA_PATH=runs/data/my-bert_text_sentence examples/pretrain_bert.sh
#   examples/pretrain_bert.sh --train-iters 1000 --save-interval 500   # flags given here win
#
# One plain Python process (no torchrun): tensor- and data-parallel size 1. Pick the GPU with
# CUDA_VISIBLE_DEVICES. Run examples/preprocess_data.sh first to make the dataset. Rerunning
# the script resumes from the latest checkpoint in CHECKPOINT_PATH. See docs/training.md.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Paths. DATA_PATH is a dataset prefix (the .bin/.idx pair without its extension), or
# "weight prefix weight prefix ..." to blend several datasets.
DATA_PATH="${DATA_PATH:-$REPO_ROOT/runs/data/my-bert_text_sentence}"
VOCAB_FILE="${VOCAB_FILE:-$REPO_ROOT/data/bert-large-uncased-vocab.txt}"
TOKENIZER_TYPE="${TOKENIZER_TYPE:-BertWordPieceLowerCase}"
CHECKPOINT_PATH="${CHECKPOINT_PATH:-$REPO_ROOT/checkpoints/bert_345m}"
TENSORBOARD_DIR="${TENSORBOARD_DIR:-}"   # empty: no TensorBoard scalars
PYTHON="${PYTHON:-python}"

# Batch: each forward/backward takes MICRO_BATCH_SIZE samples; each optimizer step takes
# GLOBAL_BATCH_SIZE. On one GPU the data-parallel size is 1, so the gradients of
# GLOBAL_BATCH_SIZE / MICRO_BATCH_SIZE micro-batches (2 here) are accumulated per step.
MICRO_BATCH_SIZE="${MICRO_BATCH_SIZE:-4}"
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-8}"

# Fail here, before the model is built, if the dataset is missing.
read -r -a DATA_PATH_ARGS <<< "$DATA_PATH"
for item in "${DATA_PATH_ARGS[@]}"; do
    if [[ ! "$item" =~ ^[0-9.eE+-]+$ && ! -f "$item.idx" ]]; then
        echo "pretrain_bert.sh: no dataset $item.idx; make it with examples/preprocess_data.sh" >&2
        exit 1
    fi
done

# Model: BERT-345M of the Megatron-LM paper. The FFN hidden size defaults to 4 x 1024.
MODEL_ARGS=(
    --num-layers 24
    --hidden-size 1024
    --num-attention-heads 16
    --seq-length 512
    --max-position-embeddings 512
)

# Batch sizes (see above).
BATCH_ARGS=(
    --micro-batch-size "$MICRO_BATCH_SIZE"
    --global-batch-size "$GLOBAL_BATCH_SIZE"
)

# Schedule and optimizer: AdamW, peak learning rate 1e-4 reached after a linear warm-up over 1%
# of the decay (9,900 iterations), then linear decay to 1e-5 at iteration 990,000, flat after.
TRAINING_ARGS=(
    --train-iters 2000000
    --lr 1e-4
    --min-lr 1e-5
    --lr-decay-style linear
    --lr-decay-iters 990000
    --lr-warmup-fraction 0.01
    --weight-decay 1e-2
    --clip-grad 1.0
)

# Mixed precision: bf16 weights and activations, fp32 master weights and optimizer state.
# On GPUs without bf16 (before Ampere) use fp16 with dynamic loss scaling instead; the values
# shown are the defaults. A flag given on the command line cannot switch bf16 off, so edit here.
PRECISION_ARGS=(--bf16)
# PRECISION_ARGS=(--fp16 --initial-loss-scale 4294967296 --min-loss-scale 1
#                 --loss-scale-window 1000 --hysteresis 2)

# Data: 94.9% of the documents train, 5% validate, 0.1% test.
DATA_ARGS=(
    --data-path "${DATA_PATH_ARGS[@]}"
    --vocab-file "$VOCAB_FILE"
    --tokenizer-type "$TOKENIZER_TYPE"
    --split "949,50,1"
)

# Logging, evaluation (10 validation micro-batches every 1,000 iterations) and checkpoints. The
# same directory is saved to and loaded from, so a rerun picks up where the last save left off.
OUTPUT_ARGS=(
    --log-interval 100
    --eval-interval 1000
    --eval-iters 10
    --save-interval 10000
    --save "$CHECKPOINT_PATH"
    --load "$CHECKPOINT_PATH"
)
if [[ -n "$TENSORBOARD_DIR" ]]; then
    OUTPUT_ARGS+=(--tensorboard-dir "$TENSORBOARD_DIR")
fi

# Launch. Flags given to this script come last, so they override the ones above.
exec "$PYTHON" "$REPO_ROOT/pretrain_bert.py" \
    "${MODEL_ARGS[@]}" \
    "${BATCH_ARGS[@]}" \
    "${TRAINING_ARGS[@]}" \
    "${PRECISION_ARGS[@]}" \
    "${DATA_ARGS[@]}" \
    "${OUTPUT_ARGS[@]}" \
    "$@"
