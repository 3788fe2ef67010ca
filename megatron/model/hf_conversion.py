"""Name and layout map between this model's state dict and Hugging Face's ``MegatronBert*``.

Plain functions on state dicts (no ``transformers`` import), used by the parity tests and by the
checkpoint tools. The four choices that decide compatibility:

* **padded vocabulary**: our word embedding and LM bias have ``padded_vocab_size`` rows
  (``make_vocab_size_divisible_by * tp``); Hugging Face's have ``vocab_size``. Export strips the
  padding (or keeps it on request); import pads with zeros.
* **binary head**: Megatron trains it for sentence order, Hugging Face calls it
  ``seq_relationship``; the weights map one to one, only the meaning of the labels differs.
* **pre-LN**: the same in both (``attention.ln`` / ``ln`` per layer, ``encoder.ln`` at the end).
* **QKV layout**: ours is one fused weight laid out ``[num_heads, 3, head_dim]`` along its output
  dimension (Megatron checkpoint version 3.0); Hugging Face has separate query, key and value.

It also gathers a tensor-parallel model into one full state dict and slices a full state dict for
one rank, using each parameter's ``partition_dim`` / ``partition_stride``.
"""

from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron import mpu
from megatron.model.config import BertConfig

__all__ = [
    "gather_full_state_dict",
    "shard_full_state_dict",
    "megatron_to_hf_state_dict",
    "hf_to_megatron_state_dict",
    "hf_config_dict",
    "qkv_to_hf",
    "qkv_from_hf",
]

StateDict = Dict[str, torch.Tensor]

# ours (under language_model.encoder.layers.{i}.) -> HF (under bert.encoder.layer.{i}.)
_LAYER_MAP = {
    "input_layernorm": "attention.ln",
    "self_attention.dense": "attention.output.dense",
    "post_attention_layernorm": "ln",
    "mlp.dense_h_to_4h": "intermediate.dense",
    "mlp.dense_4h_to_h": "output.dense",
}
_TOP_MAP = {  # ours -> HF, for every head
    "language_model.embedding.position_embeddings.weight":
        "bert.embeddings.position_embeddings.weight",
    "language_model.embedding.tokentype_embeddings.weight":
        "bert.embeddings.token_type_embeddings.weight",
    "language_model.encoder.final_layernorm.weight": "bert.encoder.ln.weight",
    "language_model.encoder.final_layernorm.bias": "bert.encoder.ln.bias",
    "language_model.pooler.dense.weight": "bert.pooler.dense.weight",
    "language_model.pooler.dense.bias": "bert.pooler.dense.bias",
}
_HEAD_MAP = {
    "pretraining": {
        "lm_head.dense.weight": "cls.predictions.transform.dense.weight",
        "lm_head.dense.bias": "cls.predictions.transform.dense.bias",
        "lm_head.layernorm.weight": "cls.predictions.transform.LayerNorm.weight",
        "lm_head.layernorm.bias": "cls.predictions.transform.LayerNorm.bias",
        "binary_head.weight": "cls.seq_relationship.weight",
        "binary_head.bias": "cls.seq_relationship.bias",
    },
    "classification": {"classification_head.weight": "classifier.weight",
                       "classification_head.bias": "classifier.bias"},
    "multiple_choice": {"multichoice_head.weight": "classifier.weight",
                        "multichoice_head.bias": "classifier.bias"},
}
HF_ARCHITECTURES = {
    "pretraining": "MegatronBertForPreTraining",
    "classification": "MegatronBertForSequenceClassification",
    "multiple_choice": "MegatronBertForMultipleChoice",
}


# ------------------------------------------------------------------ tensor-parallel gathering


def gather_full_state_dict(model: nn.Module, process_group=None) -> StateDict:
    """All-gather every sharded parameter of ``model``: the state dict of the same model at TP=1.

    Collective over the tensor-parallel group (every rank gets the full dict).
    """
    group = mpu.parallel_state.resolve_tensor_model_parallel_group(process_group)
    world_size = mpu.parallel_state.group_size(group)
    full = {}
    for name, param in model.named_parameters():
        tensor = param.detach()
        if world_size > 1 and getattr(param, "tensor_model_parallel", False):
            shards = [torch.empty_like(tensor) for _ in range(world_size)]
            dist.all_gather(shards, tensor.contiguous(), group=group)
            tensor = mpu.utils.merge_partitions_with_stride(
                shards, param.partition_dim, param.partition_stride)
        full[name] = tensor.clone()
    return full


def shard_full_state_dict(full: StateDict, model: nn.Module, process_group=None) -> StateDict:
    """This rank's slice of a full (TP=1) state dict, shaped like ``model``'s parameters.

    Raises:
        KeyError: naming a parameter of ``model`` missing from ``full``.
        ValueError: naming a parameter whose full shape does not fit.
    """
    group = mpu.parallel_state.resolve_tensor_model_parallel_group(process_group)
    world_size, rank = mpu.parallel_state.group_size(group), mpu.parallel_state.group_rank(group)
    local = {}
    for name, param in model.named_parameters():
        if name not in full:
            raise KeyError(f"parameter {name} is missing from the state dict")
        tensor = full[name]
        if getattr(param, "tensor_model_parallel", False) and world_size > 1:
            tensor = mpu.utils.split_tensor_along_dim_with_stride(
                tensor, param.partition_dim, world_size, rank, param.partition_stride)
        if tensor.shape != param.shape:
            raise ValueError(f"parameter {name}: shape {tuple(tensor.shape)} does not fit "
                             f"{tuple(param.shape)} on rank {rank} of {world_size}")
        local[name] = tensor.to(param.dtype)
    return local


# ------------------------------------------------------------------------------ QKV layout


def qkv_to_hf(weight: torch.Tensor, num_heads: int):
    """Split a fused ``[num_heads * 3 * head_dim, ...]`` tensor into query, key and value."""
    rest = weight.shape[1:]
    per_head = weight.reshape(num_heads, 3, -1, *rest)  # [heads, 3, head_dim, ...]
    return tuple(per_head[:, i].reshape(-1, *rest).contiguous() for i in range(3))


def qkv_from_hf(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                num_heads: int) -> torch.Tensor:
    """Fuse query, key and value into the per-head ``[num_heads, 3, head_dim]`` layout."""
    rest = query.shape[1:]
    parts = [t.reshape(num_heads, -1, *rest) for t in (query, key, value)]
    return torch.stack(parts, dim=1).reshape(-1, *rest).contiguous()


# ---------------------------------------------------------------------------- name mapping


def _name_pairs(config: BertConfig, head: str):
    """``(ours, theirs, optional)`` for every tensor that maps one to one, in both directions.

    Optional tensors (the binary head, token-type embeddings) are converted when present.
    """
    for ours, theirs in list(_TOP_MAP.items()) + list(_HEAD_MAP[head].items()):
        yield ours, theirs, ours.startswith("binary_head") or "tokentype" in ours
    for i in range(config.num_layers):
        for ours, theirs in _LAYER_MAP.items():
            for kind in ("weight", "bias"):
                yield (f"language_model.encoder.layers.{i}.{ours}.{kind}",
                       f"bert.encoder.layer.{i}.{theirs}.{kind}", False)


def _head_type(state_dict: StateDict) -> str:
    if "classification_head.weight" in state_dict:
        return "classification"
    if "multichoice_head.weight" in state_dict:
        return "multiple_choice"
    return "pretraining"


def megatron_to_hf_state_dict(full: StateDict, config: BertConfig,
                              keep_padded_vocab: bool = False) -> StateDict:
    """Our full (TP=1 or gathered) state dict -> a ``MegatronBert*`` state dict.

    The head is recognised from the keys (``lm_head`` -> ``MegatronBertForPreTraining``,
    ``classification_head`` -> ``...ForSequenceClassification``, ``multichoice_head`` ->
    ``...ForMultipleChoice``).

    Raises:
        KeyError: naming the first expected key that is missing, or the first key left unused.
    """
    head = _head_type(full)
    vocab = config.padded_vocab_size if keep_padded_vocab else config.vocab_size
    used = set()

    def take(name: str) -> torch.Tensor:
        if name not in full:
            raise KeyError(f"state dict has no {name!r} (needed for the {head} model)")
        used.add(name)
        return full[name]

    hf = {"bert.embeddings.word_embeddings.weight":
          take("language_model.embedding.word_embeddings.weight")[:vocab]}
    for ours, theirs, optional in _name_pairs(config, head):
        if ours in full or not optional:
            hf[theirs] = take(ours)
    for i in range(config.num_layers):
        src, dst = f"language_model.encoder.layers.{i}.", f"bert.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = qkv_to_hf(take(f"{src}self_attention.query_key_value.{kind}"),
                                config.num_attention_heads)
            for part, tensor in zip(("query", "key", "value"), (q, k, v)):
                hf[f"{dst}attention.self.{part}.{kind}"] = tensor
    if head == "pretraining":
        bias = take("lm_head.bias")[:vocab]
        hf["cls.predictions.bias"] = bias
        hf["cls.predictions.decoder.bias"] = bias
        hf["cls.predictions.decoder.weight"] = hf["bert.embeddings.word_embeddings.weight"]
    unused = sorted(set(full) - used)
    if unused:
        raise KeyError(f"state dict key {unused[0]!r} has no Hugging Face counterpart")
    return {name: tensor.contiguous() for name, tensor in hf.items()}


def hf_to_megatron_state_dict(hf: StateDict, config: BertConfig,
                              head: Optional[str] = None) -> StateDict:
    """A ``MegatronBert*`` state dict -> our full (TP=1 layout) state dict.

    The vocabulary is padded with zero rows to ``config.padded_vocab_size``.

    Args:
        hf: the Hugging Face state dict.
        config: our configuration of the same model.
        head: ``"pretraining"``, ``"classification"`` or ``"multiple_choice"``; by default
            recognised from the keys (a one-row ``classifier`` is ambiguous and must be named).

    Raises:
        KeyError: naming the first missing Hugging Face key.
        ValueError: naming a tensor whose shape does not match ``config``, or an unknown head.
    """
    if head is None:
        if "cls.predictions.bias" in hf:
            head = "pretraining"
        elif "classifier.weight" in hf and hf["classifier.weight"].shape[0] > 1:
            head = "classification"
        else:
            raise ValueError("cannot tell a regression head from a multiple-choice head: pass "
                             "head='classification' or head='multiple_choice'")
    if head not in _HEAD_MAP:
        raise ValueError(f"unknown head {head!r}; expected one of {sorted(_HEAD_MAP)}")
    return _hf_to_megatron(hf, config, head)


def _hf_to_megatron(hf: StateDict, config: BertConfig, head: str) -> StateDict:
    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise KeyError(f"Hugging Face state dict has no {name!r}")
        return hf[name]

    def pad_rows(tensor: torch.Tensor, name: str) -> torch.Tensor:
        if tensor.shape[0] not in (config.vocab_size, config.padded_vocab_size):
            raise ValueError(f"{name}: {tensor.shape[0]} rows, expected vocab_size "
                             f"{config.vocab_size} or padded_vocab_size {config.padded_vocab_size}")
        padded = tensor.new_zeros((config.padded_vocab_size,) + tuple(tensor.shape[1:]))
        padded[: config.vocab_size] = tensor[: config.vocab_size]
        return padded

    ours = {"language_model.embedding.word_embeddings.weight":
            pad_rows(take("bert.embeddings.word_embeddings.weight"),
                     "bert.embeddings.word_embeddings.weight")}
    for mine, theirs, optional in _name_pairs(config, head):
        if theirs in hf or not optional:
            ours[mine] = take(theirs)
    for i in range(config.num_layers):
        dst, src = f"language_model.encoder.layers.{i}.", f"bert.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            parts = [take(f"{src}attention.self.{p}.{kind}") for p in ("query", "key", "value")]
            ours[f"{dst}self_attention.query_key_value.{kind}"] = qkv_from_hf(
                *parts, config.num_attention_heads)
    if head == "pretraining":
        ours["lm_head.bias"] = pad_rows(take("cls.predictions.bias"), "cls.predictions.bias")
    return ours


def hf_config_dict(config: BertConfig, num_labels: Optional[int] = None,
                   head: str = "pretraining", keep_padded_vocab: bool = False) -> dict:
    """Keyword arguments of ``transformers.MegatronBertConfig`` for the same model."""
    out = {
        "architectures": [HF_ARCHITECTURES[head]],
        "vocab_size": config.padded_vocab_size if keep_padded_vocab else config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.ffn_hidden_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": config.hidden_dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": max(config.num_tokentypes, 1),
        "layer_norm_eps": config.layernorm_epsilon,
        "initializer_range": config.init_method_std,
    }
    if num_labels is not None:
        out["num_labels"] = num_labels
    return out
