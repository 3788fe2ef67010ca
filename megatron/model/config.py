"""The BERT model configuration: one typed dataclass, validated when it is built."""

import dataclasses
import math
from typing import Optional

import torch

__all__ = ["BertConfig", "vocab_size_with_padding"]


def vocab_size_with_padding(
    vocab_size: int, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1
) -> int:
    """Round ``vocab_size`` up to a multiple of ``make_vocab_size_divisible_by * tp``, as Megatron.

    30522 becomes 30592 at TP=1 and 30720 at TP=2: every rank then owns an equal, nicely sized
    slice of the embedding and of the logits. The padding rows never take part in the loss (see
    :class:`megatron.model.BertModel`), so the model computes the same function at every TP size.

    Raises:
        ValueError: for a non-positive argument.
    """
    for name, value in (("vocab_size", vocab_size),
                        ("make_vocab_size_divisible_by", make_vocab_size_divisible_by),
                        ("tensor_model_parallel_size", tensor_model_parallel_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


@dataclasses.dataclass
class BertConfig:
    """Shape and behaviour of a Megatron BERT (pre-LayerNorm) model.

    Attributes:
        num_layers: transformer layers.
        hidden_size: width ``h`` of the residual stream.
        num_attention_heads: attention heads; must divide ``hidden_size`` and be divisible by the
            tensor-parallel size (each rank owns whole heads).
        vocab_size: the tokenizer's vocabulary size (the real rows).
        ffn_hidden_size: MLP width; default ``4 * hidden_size``.
        max_position_embeddings: learned absolute positions (longest sequence).
        make_vocab_size_divisible_by: padding granularity per tensor-parallel rank.
        tensor_model_parallel_size: ranks each layer is split over (decides the padding).
        padded_vocab_size: rows of the word embedding; default: ``vocab_size`` padded to a
            multiple of ``make_vocab_size_divisible_by * tensor_model_parallel_size``.
        hidden_dropout: dropout on embeddings and on each sublayer's output.
        attention_dropout: dropout on attention probabilities.
        layernorm_epsilon: LayerNorm epsilon (1e-12 as in BERT).
        num_tokentypes: token-type (segment) embeddings; 0 for none.
        add_binary_head: add the 2-way head on the pooled output (sentence order / next sentence).
        add_pooler: add the pooler (dense + tanh on ``[CLS]``).
        init_method_std: standard deviation of the normal initialisation; output projections of
            each sublayer use ``std / sqrt(2 * num_layers)`` (Megatron's scaled init).
        fp16: run in float16 (params and activations; LayerNorm, softmax and loss in fp32).
        bf16: run in bfloat16 (same rules).
        recompute_activations: recompute each transformer layer in backward (full recompute
            per layer) instead of keeping its activations.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    ffn_hidden_size: Optional[int] = None
    max_position_embeddings: int = 512
    make_vocab_size_divisible_by: int = 128
    tensor_model_parallel_size: int = 1
    padded_vocab_size: Optional[int] = None
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layernorm_epsilon: float = 1e-12
    num_tokentypes: int = 2
    add_binary_head: bool = True
    add_pooler: bool = True
    init_method_std: float = 0.02
    fp16: bool = False
    bf16: bool = False
    recompute_activations: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                     "max_position_embeddings", "make_vocab_size_divisible_by",
                     "tensor_model_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.ffn_hidden_size < 1:
            raise ValueError(f"ffn_hidden_size must be positive, got {self.ffn_hidden_size}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        tp = self.tensor_model_parallel_size
        if self.num_attention_heads % tp != 0:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"tensor_model_parallel_size {tp}"
            )
        if self.ffn_hidden_size % tp != 0:
            raise ValueError(
                f"ffn_hidden_size {self.ffn_hidden_size} is not divisible by "
                f"tensor_model_parallel_size {tp}"
            )
        if self.padded_vocab_size is None:
            self.padded_vocab_size = vocab_size_with_padding(
                self.vocab_size, self.make_vocab_size_divisible_by, tp
            )
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(
                f"padded_vocab_size {self.padded_vocab_size} is smaller than vocab_size "
                f"{self.vocab_size}"
            )
        if self.padded_vocab_size % tp != 0:
            raise ValueError(
                f"padded_vocab_size {self.padded_vocab_size} is not divisible by "
                f"tensor_model_parallel_size {tp}"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.fp16 and self.bf16:
            raise ValueError("fp16 and bf16 cannot both be set")
        if self.num_tokentypes < 0:
            raise ValueError(f"num_tokentypes must be >= 0, got {self.num_tokentypes}")
        if self.add_binary_head and not self.add_pooler:
            raise ValueError("add_binary_head needs add_pooler (the binary head reads the pooler)")
        if not self.init_method_std > 0:
            raise ValueError(f"init_method_std must be positive, got {self.init_method_std}")

    @property
    def params_dtype(self) -> torch.dtype:
        """Dtype of parameters and activations."""
        if self.fp16:
            return torch.float16
        if self.bf16:
            return torch.bfloat16
        return torch.float32

    @property
    def kv_channels(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        """Plain dict of the fields (for checkpoints)."""
        return dataclasses.asdict(self)
