"""Tokenizers with Megatron-LM's interface: BERT WordPiece (cased and uncased) and SentencePiece."""

from megatron.tokenizer.bert_tokenization import FullTokenizer
from megatron.tokenizer.tokenizer import (
    TOKENIZER_TYPES,
    AbstractTokenizer,
    build_tokenizer,
)

__all__ = ["AbstractTokenizer", "FullTokenizer", "TOKENIZER_TYPES", "build_tokenizer"]
