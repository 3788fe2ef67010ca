"""How each tensor of a checkpoint is split over tensor-parallel ranks, and how to re-split it.

Every parameter of the BERT models is either replicated or split along one dimension
(``partition_dim``) with ``partition_stride`` 1, as :mod:`megatron.mpu.layers` tags it:

=====================================================  =====  ==============================
parameter                                              dim    layer
=====================================================  =====  ==============================
``language_model.embedding.word_embeddings.weight``    0      VocabParallelEmbedding (rows)
``lm_head.bias``                                       0      vocabulary-parallel LM bias
``*.self_attention.query_key_value.{weight,bias}``     0      ColumnParallelLinear
``*.mlp.dense_h_to_4h.{weight,bias}``                  0      ColumnParallelLinear
``*.self_attention.dense.weight``                      1      RowParallelLinear
``*.mlp.dense_4h_to_h.weight``                         1      RowParallelLinear
everything else                                        --     replicated
=====================================================  =====  ==============================

The fused QKV weight is laid out ``[num_heads, 3, head_dim]`` along dim 0 (checkpoint version
3.0), so a contiguous split gives each rank whole heads and no reordering is needed between
tensor-parallel sizes. The two vocabulary-parallel tensors have ``padded_vocab_size`` rows, which
depends on the tensor-parallel size: :func:`target_shard` pads them with zero rows or drops
padding rows while it re-splits.

The functions work on one tensor at a time and take the source shards through a callable, so a
caller can hand out memory-mapped shards and read only the slices a target rank needs.
"""

import dataclasses
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from megatron import mpu

__all__ = [
    "ShardSpec",
    "VOCAB_PARALLEL",
    "is_known_parameter",
    "shard_spec",
    "optimizer_param_names",
    "target_shard",
    "trailing_zero_rows",
]

StateDict = Dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """How a parameter is split: along ``dim`` into pieces, ``stride`` pieces per rank."""

    dim: int
    stride: int = 1


VOCAB_PARALLEL = ("language_model.embedding.word_embeddings.weight", "lm_head.bias")

_SPLIT = [
    (re.compile(r"^language_model\.embedding\.word_embeddings\.weight$"), ShardSpec(0)),
    (re.compile(r"^lm_head\.bias$"), ShardSpec(0)),
    (re.compile(r"\.self_attention\.query_key_value\.(weight|bias)$"), ShardSpec(0)),
    (re.compile(r"\.mlp\.dense_h_to_4h\.(weight|bias)$"), ShardSpec(0)),
    (re.compile(r"\.self_attention\.dense\.weight$"), ShardSpec(1)),
    (re.compile(r"\.mlp\.dense_4h_to_h\.weight$"), ShardSpec(1)),
]


_KNOWN = re.compile(
    r"^(language_model\.embedding\.(word|position|tokentype)_embeddings\.weight"
    r"|language_model\.encoder\.layers\.\d+\.(input_layernorm|post_attention_layernorm"
    r"|self_attention\.query_key_value|self_attention\.dense|mlp\.dense_h_to_4h"
    r"|mlp\.dense_4h_to_h)\.(weight|bias)"
    r"|language_model\.encoder\.final_layernorm\.(weight|bias)"
    r"|language_model\.pooler\.dense\.(weight|bias)"
    r"|lm_head\.(bias|dense\.weight|dense\.bias|layernorm\.weight|layernorm\.bias)"
    r"|(binary_head|classification_head|multichoice_head)\.(weight|bias))$")


def is_known_parameter(name: str) -> bool:
    """Whether ``name`` is a parameter of :class:`BertModel`, ``Classification`` or
    ``MultipleChoice`` (so its split is known)."""
    return bool(_KNOWN.match(name))


def shard_spec(name: str) -> Optional[ShardSpec]:
    """The split of parameter ``name`` (our flat state-dict name), or ``None`` if replicated."""
    for pattern, spec in _SPLIT:
        if pattern.search(name):
            return spec
    return None


def optimizer_param_names(shapes: Dict[str, Sequence[int]]) -> List[List[str]]:
    """Parameter names per AdamW group, in the order the optimizer numbers them.

    Mirrors :func:`megatron.training.optimizer.get_param_groups`: weights with weight decay
    first, then every 1-D parameter and every ``*.bias``, each in ``named_parameters`` order
    (the order of the model's state dict). Empty groups are left out.

    Args:
        shapes: the model's flat state dict (or ``{name: shape}``), in state-dict order.
    """
    decay, no_decay = [], []
    for name, shape in shapes.items():
        shape = tuple(shape.shape) if isinstance(shape, torch.Tensor) else tuple(shape)
        (no_decay if len(shape) == 1 or name.endswith(".bias") else decay).append(name)
    return [group for group in (decay, no_decay) if group]


def trailing_zero_rows(pieces: Iterable[torch.Tensor]) -> int:
    """Number of all-zero rows at the end of ``pieces`` stacked in order.

    ``pieces`` are consecutive row blocks in row order (e.g. every rank's slice of the word
    embedding); they are scanned from the last, and the scan stops at the first non-zero row.
    """
    count = 0
    for piece in reversed(list(pieces)):
        rows = piece.reshape(piece.shape[0], -1)
        nonzero = (rows != 0).any(dim=1).nonzero()
        if nonzero.numel():
            return count + rows.shape[0] - 1 - int(nonzero.max())
        count += rows.shape[0]
    return count


def _check_pieces(name: str, shapes: List[Tuple[int, ...]]) -> None:
    for rank, shape in enumerate(shapes[1:], start=1):
        if shape != shapes[0]:
            raise ValueError(f"{name}: rank {rank} has shape {shape}, rank 0 has {shapes[0]}")


def target_shard(name: str, source: Callable[[int], torch.Tensor], source_tp: int,
                 target_tp: int, rank: int, rows: Optional[int] = None,
                 spec: Optional[ShardSpec] = None) -> torch.Tensor:
    """Rank ``rank``'s slice of tensor ``name`` at tensor-parallel size ``target_tp``.

    Only the source shards that overlap the target slice are read, and only their overlapping
    parts are copied: a target rank at TP=8 reads an eighth of a TP=1 tensor, a TP=1 target
    concatenates the eight TP=8 shards.

    Args:
        name: our flat state-dict name (decides the split, see :func:`shard_spec`).
        source: ``source(r)`` returns source rank ``r``'s shard.
        source_tp: tensor-parallel size of the source.
        target_tp: tensor-parallel size wanted.
        rank: the target rank.
        rows: for a vocabulary-parallel tensor, its new full size along the split dimension
            (``padded_vocab_size`` for ``target_tp``): zero rows are appended, or trailing
            rows dropped (the caller checks that they are padding).
        spec: the split; default ``shard_spec(name)``. Optimizer states pass their parameter's.

    Returns:
        A new tensor (never a view of a source shard).

    Raises:
        ValueError: naming the tensor when the sizes do not divide.
    """
    spec = spec if spec is not None else shard_spec(name)
    if spec is None:
        return source(0).clone()
    first = source(0)
    old = first.shape[spec.dim] * source_tp
    new = old if rows is None else rows
    if new % target_tp:
        raise ValueError(f"{name}: size {new} of dim {spec.dim} is not divisible by "
                         f"tensor-parallel size {target_tp}")
    if spec.stride != 1:
        if new != old:
            raise ValueError(f"{name}: cannot resize a tensor split with stride {spec.stride}")
        full = mpu.utils.merge_partitions_with_stride(
            [source(r) for r in range(source_tp)], spec.dim, spec.stride)
        return mpu.utils.split_tensor_along_dim_with_stride(
            full, spec.dim, target_tp, rank, spec.stride)
    local_old, local_new = old // source_tp, new // target_tp
    start, stop = rank * local_new, (rank + 1) * local_new
    parts, shapes = [], []
    for r in range(start // local_old, min(source_tp, -(-stop // local_old))):
        shard = source(r)
        shapes.append(tuple(shard.shape))
        lo, hi = max(start, r * local_old), min(stop, (r + 1) * local_old)
        parts.append(shard.narrow(spec.dim, lo - r * local_old, hi - lo))
    _check_pieces(name, shapes)
    if stop > old:
        pad_shape = list(first.shape)
        pad_shape[spec.dim] = stop - max(start, old)
        parts.append(first.new_zeros(pad_shape))
    if len(parts) == 1:
        return parts[0].clone(memory_format=torch.contiguous_format)
    return torch.cat(parts, dim=spec.dim)
