#!/usr/bin/env bash
# Tokenize a loose-JSON corpus into the indexed dataset that examples/pretrain_bert*.sh train on.
#
#   INPUT=my-corpus.jsonl OUTPUT_PREFIX=runs/data/my-bert examples/preprocess_data.sh
#
# The input has one JSON object a line, the document under "text":  {"text": "First line..."}
# The output is ${OUTPUT_PREFIX}_text_sentence.bin and ${OUTPUT_PREFIX}_text_sentence.idx; hand
# ${OUTPUT_PREFIX}_text_sentence to the training scripts as DATA_PATH. Arguments given to this
# script go on to tools/preprocess_data.py (for example --skip-bad-lines).
# With no settings it tokenizes the Shakespeare sample shipped in data/, as a quick check.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Where the corpus is read from and where the dataset is written.
INPUT="${INPUT:-$REPO_ROOT/data/shakespeare_tiny.jsonl}"
OUTPUT_PREFIX="${OUTPUT_PREFIX:-$REPO_ROOT/runs/data/my-bert}"

# Tokenizer. Train with the same vocabulary and tokenizer type: the token ids in the dataset
# mean nothing under another vocabulary. For cased text use BertWordPieceCase with
# data/bert-large-cased-vocab.txt.
VOCAB_FILE="${VOCAB_FILE:-$REPO_ROOT/data/bert-large-uncased-vocab.txt}"
TOKENIZER_TYPE="${TOKENIZER_TYPE:-BertWordPieceLowerCase}"

# Tokenizer processes; the reading and writing stay in the main process.
WORKERS="${WORKERS:-$(nproc 2>/dev/null || echo 4)}"
PYTHON="${PYTHON:-python}"

if [[ ! -f "$INPUT" ]]; then
    echo "preprocess_data.sh: INPUT=$INPUT does not exist" >&2
    exit 1
fi
mkdir -p "$(dirname "$OUTPUT_PREFIX")"

# --split-sentences stores one sequence per sentence. The BERT dataset builds each sample from
# whole sentences and, for the sentence-order (or next-sentence) head, swaps two segments, so
# BERT training wants this; without it the output is ${OUTPUT_PREFIX}_text_document.
"$PYTHON" "$REPO_ROOT/tools/preprocess_data.py" \
    --input "$INPUT" \
    --output-prefix "$OUTPUT_PREFIX" \
    --vocab-file "$VOCAB_FILE" \
    --tokenizer-type "$TOKENIZER_TYPE" \
    --split-sentences \
    --workers "$WORKERS" \
    "$@"

echo "preprocess_data.sh: train with DATA_PATH=${OUTPUT_PREFIX}_text_sentence"
