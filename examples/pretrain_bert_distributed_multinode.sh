#!/usr/bin/env bash
# Pretrain BERT-345M on several nodes of 8 GPUs: tensor parallelism 8 inside each node, data
# parallelism across the nodes. Run this script once on every node, with the same settings:
#
#   # on node 0 (its hostname is node0) and, at the same time, on node 1:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 examples/pretrain_bert_distributed_multinode.sh
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 examples/pretrain_bert_distributed_multinode.sh
#
# The nodes meet through torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT, hosted by the
# torchrun of the node that MASTER_ADDR names (one of the nodes). DATA_PATH, VOCAB_FILE and CHECKPOINT_PATH must name the same
# files on every node (a shared file system). On Slurm use examples/pretrain_bert_slurm.sbatch.
# See docs/training.md.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Paths (shared by all nodes). DATA_PATH is a dataset prefix, or "weight prefix weight prefix
# ..." to blend several datasets.
DATA_PATH="${DATA_PATH:-$REPO_ROOT/runs/data/my-bert_text_sentence}"
VOCAB_FILE="${VOCAB_FILE:-$REPO_ROOT/data/bert-large-uncased-vocab.txt}"
TOKENIZER_TYPE="${TOKENIZER_TYPE:-BertWordPieceLowerCase}"
CHECKPOINT_PATH="${CHECKPOINT_PATH:-$REPO_ROOT/checkpoints/bert_345m_tp8}"
TENSORBOARD_DIR="${TENSORBOARD_DIR:-}"   # empty: no TensorBoard scalars (written by rank 0)

# The cluster. MASTER_ADDR must be reachable from every node; RDZV_ID keeps two jobs that share
# an address apart.
NNODES="${NNODES:-2}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:?set MASTER_ADDR to the hostname or IP of one of the nodes}"
MASTER_PORT="${MASTER_PORT:-6000}"
RDZV_ID="${RDZV_ID:-bert_345m}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"

# Parallelism: a tensor-parallel group of TP_SIZE consecutive ranks lives inside one node (the
# all-reduces of every layer stay on NVLink); the NNODES x GPUS_PER_NODE / TP_SIZE replicas
# average their gradients across the nodes once per step.
TP_SIZE="${TP_SIZE:-8}"
DP_SIZE=$(( NNODES * GPUS_PER_NODE / TP_SIZE ))

# Batch: 4 samples per forward/backward on each replica; by default 8 micro-batches accumulated
# per replica, so the global batch is 32 x DP_SIZE (64 on 2 nodes). GLOBAL_BATCH_SIZE must be a
# multiple of MICRO_BATCH_SIZE x DP_SIZE.
MICRO_BATCH_SIZE="${MICRO_BATCH_SIZE:-4}"
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-$(( MICRO_BATCH_SIZE * DP_SIZE * 8 ))}"

# Fail here, before the rendezvous, if this node does not see the dataset.
read -r -a DATA_PATH_ARGS <<< "$DATA_PATH"
for item in "${DATA_PATH_ARGS[@]}"; do
    if [[ ! "$item" =~ ^[0-9.eE+-]+$ && ! -f "$item.idx" ]]; then
        echo "pretrain_bert_distributed_multinode.sh: no dataset $item.idx on $(hostname);" \
             "make it with examples/preprocess_data.sh on a file system all nodes share" >&2
        exit 1
    fi
done

# torchrun: GPUS_PER_NODE processes here, NNODES nodes in all. With the c10d rendezvous
# torchrun numbers the nodes itself, in the order they join, and ignores --node_rank (it warns
# so); the flag is kept for a switch to --rdzv_backend static, where it is needed. No restarts:
# a failed rank ends the job.
LAUNCH_ARGS=(
    --nproc_per_node "$GPUS_PER_NODE"
    --nnodes "$NNODES"
    --node_rank "$NODE_RANK"
    --rdzv_id "$RDZV_ID"
    --rdzv_backend c10d
    --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"
    --max_restarts 0
)

# Model: BERT-345M of the Megatron-LM paper.
MODEL_ARGS=(
    --num-layers 24
    --hidden-size 1024
    --num-attention-heads 16
    --seq-length 512
    --max-position-embeddings 512
)

# Parallelism (see above), NCCL for all collectives.
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
# to 1e-5 at iteration 990,000, flat after. With a larger global batch than the single-GPU
# script's, consider fewer iterations and a larger learning rate.
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

# Data: 94.9% of the documents train, 5% validate, 0.1% test. Global rank 0 builds the sample
# index caches next to the data first; the other ranks wait, then read them.
DATA_ARGS=(
    --data-path "${DATA_PATH_ARGS[@]}"
    --vocab-file "$VOCAB_FILE"
    --tokenizer-type "$TOKENIZER_TYPE"
    --split "949,50,1"
)

# Logging, evaluation and checkpoints (saved to and resumed from the same shared directory;
# only the first replica writes, one mp_rank_XX file per TP rank).
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
