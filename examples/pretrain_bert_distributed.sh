#!/usr/bin/env bash
# Pretrain BERT-345M on one node of 8 GPUs, each layer split over all 8 (tensor parallelism 8).
#
#   DATA_PATH=runs/data/my-bert_text_sentence examples/pretrain_bert_distributed.sh
#   TP_SIZE=2 examples/pretrain_bert_distributed.sh    # TP 2 x data parallelism 4 instead
#   examples/pretrain_bert_distributed.sh --train-iters 1000   # flags given here win
#
# torchrun starts one process per GPU. The world size is GPUS_PER_NODE and the data-parallel
# size is GPUS_PER_NODE / TP_SIZE. Megatron-LM's scripts also export
# CUDA_DEVICE_MAX_CONNECTIONS=1; this implementation does not need it. See docs/training.md.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Paths. DATA_PATH is a dataset prefix (the .bin/.idx pair without its extension), or
# "weight prefix weight prefix ..." to blend several datasets.
DATA_PATH="${DATA_PATH:-$REPO_ROOT/runs/data/my-bert_text_sentence}"
VOCAB_FILE="${VOCAB_FILE:-$REPO_ROOT/data/bert-large-uncased-vocab.txt}"
TOKENIZER_TYPE="${TOKENIZER_TYPE:-BertWordPieceLowerCase}"
CHECKPOINT_PATH="${CHECKPOINT_PATH:-$REPO_ROOT/checkpoints/bert_345m_tp8}"
TENSORBOARD_DIR="${TENSORBOARD_DIR:-}"   # empty: no TensorBoard scalars

# Processes and parallelism. 16 heads split over 8 ranks leaves 2 whole heads per rank; TP_SIZE
# must divide the 16 heads and GPUS_PER_NODE. A checkpoint only loads at the TP size it was
# saved with, hence the _tp8 in the default CHECKPOINT_PATH.
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
TP_SIZE="${TP_SIZE:-8}"
MASTER_PORT="${MASTER_PORT:-6000}"

# Batch: 4 samples per forward/backward on each data-parallel rank, 32 per optimizer step. With
# TP 8 the data-parallel size is 1, so 32 / (4 x 1) = 8 micro-batches are accumulated per step.
MICRO_BATCH_SIZE="${MICRO_BATCH_SIZE:-4}"
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-32}"

# Fail here, before 8 processes start, if the dataset is missing.
read -r -a DATA_PATH_ARGS <<< "$DATA_PATH"
for item in "${DATA_PATH_ARGS[@]}"; do
    if [[ ! "$item" =~ ^[0-9.eE+-]+$ && ! -f "$item.idx" ]]; then
        echo "pretrain_bert_distributed.sh: no dataset $item.idx; make it with" \
             "examples/preprocess_data.sh" >&2
        exit 1
    fi
done

# torchrun: one node, one process per GPU, the rendezvous on this machine. Each process finds
# its GPU through LOCAL_RANK.
LAUNCH_ARGS=(
    --nproc_per_node "$GPUS_PER_NODE"
    --nnodes 1
    --node_rank 0
    --master_addr localhost
    --master_port "$MASTER_PORT"
)

# Model: BERT-345M of the Megatron-LM paper.
MODEL_ARGS=(
    --num-layers 24
    --hidden-size 1024
    --num-attention-heads 16
    --seq-length 512
    --max-position-embeddings 512
)

# Parallelism: every layer sharded over TP_SIZE GPUs, NCCL for all collectives.
PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP_SIZE"
    --distributed-backend nccl
)

# Batch sizes (see above).
BATCH_ARGS=(
    --micro-batch-size "$MICRO_BATCH_SIZE"
    --global-batch-size "$GLOBAL_BATCH_SIZE"
)

# Schedule and optimizer: AdamW, linear warm-up over 1% of the decay to 1e-4, then linear decay
# to 1e-5 at iteration 990,000, flat after.
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

# Mixed precision: bf16 with fp32 master weights; fp16 with dynamic loss scaling on older GPUs.
PRECISION_ARGS=(--bf16)
# PRECISION_ARGS=(--fp16 --initial-loss-scale 4294967296 --min-loss-scale 1
#                 --loss-scale-window 1000 --hysteresis 2)

# Data: 94.9% of the documents train, 5% validate, 0.1% test. Tensor-parallel rank 0 reads the
# data and broadcasts each batch to the other ranks of its group.
DATA_ARGS=(
    --data-path "${DATA_PATH_ARGS[@]}"
    --vocab-file "$VOCAB_FILE"
    --tokenizer-type "$TOKENIZER_TYPE"
    --split "949,50,1"
)

# Logging, evaluation and checkpoints (saved to and resumed from the same directory; each TP
# rank writes its own mp_rank_XX file).
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
exec torchrun "${LAUNCH_ARGS[@]}" "$REPO_ROOT/pretrain_bert.py" \
    "${MODEL_ARGS[@]}" \
    "${PARALLEL_ARGS[@]}" \
    "${BATCH_ARGS[@]}" \
    "${TRAINING_ARGS[@]}" \
    "${PRECISION_ARGS[@]}" \
    "${DATA_ARGS[@]}" \
    "${OUTPUT_ARGS[@]}" \
    "$@"
