"""Megatron BERT built from :mod:`megatron.mpu` layers."""

from megatron.model.bert_model import BertLMHead, BertModel, Classification, MultipleChoice
from megatron.model.config import BertConfig, vocab_size_with_padding
from megatron.model.language_model import TransformerLanguageModel, parallel_lm_logits
from megatron.model.transformer import (
    ParallelAttention,
    ParallelMLP,
    ParallelTransformer,
    ParallelTransformerLayer,
)

__all__ = [
    "BertConfig",
    "vocab_size_with_padding",
    "BertModel",
    "BertLMHead",
    "Classification",
    "MultipleChoice",
    "TransformerLanguageModel",
    "parallel_lm_logits",
    "ParallelTransformer",
    "ParallelTransformerLayer",
    "ParallelAttention",
    "ParallelMLP",
]
