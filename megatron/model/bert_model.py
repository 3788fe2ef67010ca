"""BERT for pretraining (masked LM + binary head), for classification and for multiple choice.

Module names follow Megatron-LM, so the state dict reads ``language_model.embedding...``,
``language_model.encoder.layers.0.self_attention.query_key_value.weight``, ``lm_head...``,
``binary_head...``, ``classification_head...``, ``multichoice_head...``.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron import mpu
from megatron.model.config import BertConfig
from megatron.model.language_model import TransformerLanguageModel, parallel_lm_logits
from megatron.model.utils import (
    LayerNorm,
    get_linear_layer,
    init_method_normal,
    scaled_init_method_normal,
)

__all__ = ["BertLMHead", "BertModel", "Classification", "MultipleChoice"]


def _check_tensor_parallel_size(config: BertConfig, process_group) -> Optional[object]:
    group = mpu.parallel_state.resolve_tensor_model_parallel_group(process_group)
    size = mpu.parallel_state.group_size(group)
    if size != config.tensor_model_parallel_size:
        raise ValueError(
            f"config.tensor_model_parallel_size {config.tensor_model_parallel_size} does not match "
            f"the tensor-parallel group size {size}"
        )
    return group


def _tag_replicated_parameters(module: nn.Module) -> None:
    """Mark every parameter that is not sharded as replicated (clipping and tools read this)."""
    for param in module.parameters():
        mpu.set_defaults_if_not_set_tensor_model_parallel_attributes(param)


def _language_model(config: BertConfig, add_pooler: bool, group) -> TransformerLanguageModel:
    return TransformerLanguageModel(
        config, init_method_normal(config.init_method_std),
        scaled_init_method_normal(config.init_method_std, config.num_layers),
        add_pooler=add_pooler, process_group=group)


class BertLMHead(nn.Module):
    """``dense -> GeLU -> LayerNorm`` then logits against the tied word embeddings, plus a bias.

    The bias is vocabulary-parallel like the embedding (``[padded_vocab / p]`` per rank).
    """

    def __init__(self, config: BertConfig, process_group=None) -> None:
        super().__init__()
        self.process_group = process_group
        size = mpu.parallel_state.group_size(process_group)
        self.bias = nn.Parameter(torch.zeros(config.padded_vocab_size // size,
                                             dtype=config.params_dtype))
        mpu.set_tensor_model_parallel_attributes(self.bias, True, 0, 1)
        self.dense = get_linear_layer(config.hidden_size, config.hidden_size,
                                      init_method_normal(config.init_method_std),
                                      config.params_dtype)
        self.layernorm = LayerNorm(config.hidden_size, eps=config.layernorm_epsilon,
                                   dtype=config.params_dtype)

    def forward(self, hidden_states: torch.Tensor, word_embeddings_weight: torch.Tensor):
        hidden_states = self.layernorm(F.gelu(self.dense(hidden_states)))
        return parallel_lm_logits(hidden_states, word_embeddings_weight, self.bias,
                                  self.process_group)  # [*, V/p]


class BertModel(nn.Module):
    """Megatron BERT for pretraining: masked-LM head and (optionally) the binary head.

    Computes the same function as ``transformers.MegatronBertForPreTraining`` given the same
    weights (see :mod:`megatron.model.hf_conversion`), at every tensor-parallel size: the
    vocabulary-padding rows of the embedding never reach the loss or the returned logits.

    Args:
        config: model configuration (``config.tensor_model_parallel_size`` must equal the size of
            the tensor-parallel group).
        process_group: tensor-parallel group (default: the initialised one, or none).
    """

    def __init__(self, config: BertConfig, process_group=None) -> None:
        super().__init__()
        group = _check_tensor_parallel_size(config, process_group)
        self.config = config
        self.process_group = group
        self.language_model = _language_model(
            config, config.add_pooler or config.add_binary_head, group)
        self.lm_head = BertLMHead(config, group)
        self.binary_head = (
            get_linear_layer(config.hidden_size, 2, init_method_normal(config.init_method_std),
                             config.params_dtype)
            if config.add_binary_head else None)
        _tag_replicated_parameters(self)

    def word_embeddings_weight(self) -> torch.Tensor:
        return self.language_model.embedding.word_embeddings.weight

    def _mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """Push the logits of padding rows (ids >= vocab_size) to the dtype's minimum."""
        start = self.language_model.embedding.word_embeddings.vocab_start_index
        local_vocab = logits.size(-1)
        first_padding = self.config.vocab_size - start
        if first_padding >= local_vocab:
            return logits
        is_padding = torch.arange(local_vocab, device=logits.device) >= first_padding
        return logits.masked_fill(is_padding, torch.finfo(logits.dtype).min)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        tokentype_ids: Optional[torch.Tensor] = None,
        lm_labels: Optional[torch.Tensor] = None,
        loss_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Run the model.

        Args:
            input_ids: ``[b, s]`` token ids.
            attention_mask: ``[b, s]``, 1 for tokens and 0 for padding (or ``None``).
            tokentype_ids: ``[b, s]`` segment ids (or ``None`` for segment 0).
            lm_labels: ``[b, s]`` target ids; when given, the masked-LM loss is returned instead
                of logits.
            loss_mask: ``[b, s]``, 1 where the loss is wanted (the masked positions). With
                ``lm_labels``, the LM head runs on those positions only (the vocabulary
                projection is the largest matmul of a small BERT).

        Returns:
            ``(lm_output, binary_logits)``. ``lm_output`` is ``[b, s]`` fp32 per-token losses
            (zero where ``loss_mask`` is 0) when ``lm_labels`` is given, else the
            vocabulary-parallel logits ``[b, s, padded_vocab / p]`` with padding columns at the
            dtype's minimum. ``binary_logits`` is ``[b, 2]`` or ``None``.
        """
        hidden_states, pooled = self.language_model(input_ids, attention_mask, tokentype_ids)
        binary_logits = self.binary_head(pooled) if self.binary_head is not None else None
        weight = self.word_embeddings_weight()
        if lm_labels is None:
            logits = self.lm_head(hidden_states, weight)
            return self._mask_padding(logits), binary_logits

        if loss_mask is None:
            logits = self._mask_padding(self.lm_head(hidden_states, weight))
            return mpu.vocab_parallel_cross_entropy(logits, lm_labels,
                                                    process_group=self.process_group), binary_logits
        selected = loss_mask.bool()  # [b, s]
        logits = self._mask_padding(self.lm_head(hidden_states[selected], weight))  # [n, V/p]
        losses = mpu.vocab_parallel_cross_entropy(logits, lm_labels[selected],
                                                  process_group=self.process_group)  # [n]
        lm_loss = losses.new_zeros(selected.shape).masked_scatter(selected, losses)
        return lm_loss, binary_logits


class Classification(nn.Module):
    """BERT with a classification (or, with one class, regression) head on the pooled output.

    Matches ``transformers.MegatronBertForSequenceClassification`` (its ``classifier`` is our
    ``classification_head``).
    """

    def __init__(self, config: BertConfig, num_classes: int, process_group=None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        group = _check_tensor_parallel_size(config, process_group)
        self.config = config
        self.num_classes = num_classes
        self.language_model = _language_model(config, True, group)
        self.classification_dropout = nn.Dropout(config.hidden_dropout)
        self.classification_head = get_linear_layer(
            config.hidden_size, num_classes, init_method_normal(config.init_method_std),
            config.params_dtype)
        _tag_replicated_parameters(self)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                tokentype_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[b, s]`` inputs -> ``[b, num_classes]`` logits."""
        _, pooled = self.language_model(input_ids, attention_mask, tokentype_ids,
                                        first_token_only=True)
        return self.classification_head(self.classification_dropout(pooled))


class MultipleChoice(nn.Module):
    """BERT scoring each of several choices: one score per ``[CLS] context [SEP] choice [SEP]``.

    Matches ``transformers.MegatronBertForMultipleChoice`` (its ``classifier`` is our
    ``multichoice_head``).
    """

    def __init__(self, config: BertConfig, process_group=None) -> None:
        super().__init__()
        group = _check_tensor_parallel_size(config, process_group)
        self.config = config
        self.language_model = _language_model(config, True, group)
        self.multichoice_dropout = nn.Dropout(config.hidden_dropout)
        self.multichoice_head = get_linear_layer(
            config.hidden_size, 1, init_method_normal(config.init_method_std), config.params_dtype)
        _tag_replicated_parameters(self)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                tokentype_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[b, choices, s]`` inputs -> ``[b, choices]`` scores."""
        B, C, S = input_ids.shape
        flat = lambda t: None if t is None else t.reshape(B * C, S)  # noqa: E731
        _, pooled = self.language_model(flat(input_ids), flat(attention_mask), flat(tokentype_ids),
                                        first_token_only=True)
        return self.multichoice_head(self.multichoice_dropout(pooled)).view(B, C)


# ------------------------------------------------------------------ Megatron checkpoint nesting

_EMBEDDING_PREFIX = "language_model.embedding."
_NESTED_LANGUAGE_MODEL_PARTS = ("encoder", "pooler")


def nested_state_dict(flat: dict) -> dict:
    """Megatron-LM's checkpoint nesting of a flat state dict of these models.

    ``language_model.embedding.word_embeddings.weight`` becomes
    ``["language_model"]["embedding"]["word_embeddings"]["weight"]``; the encoder and the pooler
    keep flat keys inside their dicts (``["language_model"]["encoder"]["layers.0.mlp..."]``);
    every head is one dict of flat keys (``["lm_head"]["dense.weight"]``,
    ``["binary_head"]["weight"]``). This is the layout Megatron-LM's tools and Hugging Face's
    Megatron-BERT converter read.

    Raises:
        ValueError: for a key outside that layout.
    """
    nested: dict = {}
    for key, value in flat.items():
        if key.startswith(_EMBEDDING_PREFIX):
            name, _, rest = key[len(_EMBEDDING_PREFIX):].partition(".")
            embedding = nested.setdefault("language_model", {}).setdefault("embedding", {})
            embedding.setdefault(name, {})[rest] = value
        elif key.startswith("language_model."):
            part, _, rest = key[len("language_model."):].partition(".")
            if part not in _NESTED_LANGUAGE_MODEL_PARTS or not rest:
                raise ValueError(f"state dict key {key!r} is not in Megatron's layout")
            nested.setdefault("language_model", {}).setdefault(part, {})[rest] = value
        else:
            head, _, rest = key.partition(".")
            if not rest:
                raise ValueError(f"state dict key {key!r} is not in Megatron's layout")
            nested.setdefault(head, {})[rest] = value
    return nested


def flat_state_dict(nested: dict) -> dict:
    """Inverse of :func:`nested_state_dict` (also accepts the pre-2021 name ``transformer``)."""
    flat = {}
    for head, part in nested.items():
        if head != "language_model":
            flat.update({f"{head}.{key}": value for key, value in part.items()})
            continue
        for name, sub in part.items():
            if name == "embedding":
                for embedding, tensors in sub.items():
                    flat.update({f"{_EMBEDDING_PREFIX}{embedding}.{key}": value
                                 for key, value in tensors.items()})
            else:
                name = "encoder" if name == "transformer" else name
                flat.update({f"language_model.{name}.{key}": value for key, value in sub.items()})
    return flat
