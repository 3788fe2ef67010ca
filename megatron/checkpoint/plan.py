"""The plan of a reshard: validate every source rank, decide vocabulary and target layout.

Also :class:`InMemorySource`, the interface of :class:`megatron.checkpoint.reader.
CheckpointSource` over state dicts already in memory, and the per-tensor step that every part
of a checkpoint goes through (:func:`shard_tensor`).
"""

import dataclasses
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron.checkpoint import legacy
from megatron.checkpoint.torch_stream import LazyTensor
from megatron.checkpoint.sharding import (
    VOCAB_PARALLEL,
    is_known_parameter,
    shard_spec,
    target_shard,
    trailing_zero_rows,
)
from megatron.model.config import vocab_size_with_padding
from megatron.training.checkpointing import CheckpointError

__all__ = ["InMemorySource", "ReshardPlan", "make_plan", "shard_tensor", "build_model_shard",
           "validate_models", "WORD_EMBEDDINGS"]

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
WORD_EMBEDDINGS = VOCAB_PARALLEL[0]


class InMemorySource:
    """The interface of :class:`CheckpointSource` over a list of loaded per-rank state dicts."""

    def __init__(self, states: Sequence[dict], num_attention_heads: Optional[int] = None) -> None:
        if not states:
            raise CheckpointError("no tensor-parallel ranks given")
        self.states = list(states)
        self.tp = len(self.states)
        self.args = self.states[0].get("args")
        self.version = legacy.check_version(self.states[0].get("checkpoint_version", 0),
                                            "state dict")
        self.iteration = int(self.states[0].get("iteration", 0))
        self.release = False
        self.num_attention_heads = num_attention_heads or getattr(
            self.args, "num_attention_heads", None)
        self._models: Dict[int, StateDict] = {}

    def file(self, rank: int) -> str:
        return f"state dict of rank {rank}"

    def state(self, rank: int) -> dict:
        return self.states[rank]

    def model(self, rank: int) -> StateDict:
        if rank not in self._models:
            heads = self.num_attention_heads and self.num_attention_heads // self.tp
            try:
                self._models[rank] = legacy.normalize_model_state_dict(
                    self.states[rank]["model"], self.version, heads, self.file(rank))
            except ValueError as error:
                raise CheckpointError(str(error)) from error
        return self._models[rank]

    def release_pages(self, *tensors: torch.Tensor) -> None:
        """Nothing to release in memory."""


# ------------------------------------------------------------------------------------ plan


@dataclasses.dataclass
class ReshardPlan:
    """What a reshard reads and writes (validated against every source rank).

    Attributes:
        source_tp, target_tp: tensor-parallel sizes.
        names: our flat parameter names, in state-dict order.
        local_shapes: each parameter's shape on one source rank.
        vocab_size: real vocabulary rows; ``vocab_size_exact`` tells whether it was given or
            saved rather than inferred from zero rows.
        source_rows, target_rows: padded vocabulary rows before and after.
        num_attention_heads: heads, when known.
        lazy: build :class:`LazyTensor` s, computed when written (the streaming path).
    """

    source_tp: int
    target_tp: int
    names: List[str]
    local_shapes: Dict[str, Tuple[int, ...]]
    vocab_size: int
    vocab_size_exact: bool
    source_rows: int
    target_rows: int
    make_vocab_size_divisible_by: int
    num_attention_heads: Optional[int]
    lazy: bool = False

    def rows(self, name: str) -> Optional[int]:
        """The new full size of ``name``'s split dimension if it changes, else ``None``."""
        return self.target_rows if name in VOCAB_PARALLEL else None


def validate_models(source) -> List[str]:
    first = source.model(0)
    names = list(first)
    if WORD_EMBEDDINGS not in first:
        raise CheckpointError(f"{source.file(0)}: no {WORD_EMBEDDINGS}; not a BERT checkpoint")
    unknown = [name for name in names if not is_known_parameter(name)]
    if unknown:
        raise CheckpointError(f"{source.file(0)}: unexpected key {unknown[0]!r} in the model "
                              "(not a parameter of megatron-bert's BERT models)")
    for rank in range(1, source.tp):
        model = source.model(rank)
        missing = [name for name in names if name not in model]
        extra = [name for name in model if name not in first]
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"has unexpected {extra[0]!r}"
            raise CheckpointError(f"{source.file(rank)} {what} (rank 0 differs)")
        for name in names:
            a, b = first[name], model[name]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise CheckpointError(
                    f"{source.file(rank)}: {name} is {tuple(b.shape)} {b.dtype}, rank 0 has "
                    f"{tuple(a.shape)} {a.dtype}")
    return names


def _infer_vocab_size(source, rows: int) -> int:
    """Real rows: all rows but the trailing ones that are zero in the embedding and LM bias."""
    zero = rows
    for name in VOCAB_PARALLEL:
        if name in source.model(0):
            pieces = [source.model(r)[name] for r in range(source.tp)]
            zero = min(zero, trailing_zero_rows(pieces))
            source.release_pages(*pieces)
    return rows - zero if zero < rows else rows


def make_plan(source, target_tp: int, *, vocab_size: Optional[int] = None,
              make_vocab_size_divisible_by: Optional[int] = None) -> ReshardPlan:
    """Validate every source rank and decide the target layout.

    Args:
        source: a :class:`CheckpointSource` or :class:`InMemorySource`.
        target_tp: the tensor-parallel size wanted.
        vocab_size: the tokenizer's vocabulary size, if known (see the module docstring).
        make_vocab_size_divisible_by: default: the checkpoint's args, else 128.

    Raises:
        CheckpointError: naming the file, key and shapes of the first inconsistency, or a
            target size that does not divide the heads.
    """
    if target_tp < 1:
        raise CheckpointError(f"target tensor-parallel size must be >= 1, got {target_tp}")
    names = validate_models(source)
    model = source.model(0)
    shapes = {name: tuple(model[name].shape) for name in names}
    rows = shapes[WORD_EMBEDDINGS][0] * source.tp
    if "lm_head.bias" in shapes and shapes["lm_head.bias"][0] * source.tp != rows:
        raise CheckpointError(f"{source.file(0)}: lm_head.bias has {shapes['lm_head.bias'][0]} "
                              f"rows per rank, the word embedding {shapes[WORD_EMBEDDINGS][0]}")
    args = source.args
    exact = vocab_size or getattr(args, "vocab_size", None)
    real = int(exact) if exact else _infer_vocab_size(source, rows)
    if real > rows:
        raise CheckpointError(f"vocab_size {real} exceeds the checkpoint's {rows} embedding rows")
    divisible = (make_vocab_size_divisible_by
                 or getattr(args, "make_vocab_size_divisible_by", None) or 128)
    heads = source.num_attention_heads
    if target_tp != source.tp:
        if heads is None:
            raise CheckpointError(f"{source.file(0)} has no args: pass the number of attention "
                                  "heads (--num-attention-heads) to split the fused QKV by heads")
        if heads % target_tp:
            raise CheckpointError(f"num_attention_heads {heads} is not divisible by the target "
                                  f"tensor-parallel size {target_tp}")
    if not exact:
        logger.info("vocabulary size %d inferred from %d trailing zero rows of %d", real,
                    rows - real, rows)
    return ReshardPlan(source.tp, target_tp, names, shapes, real, bool(exact), rows,
                       vocab_size_with_padding(real, divisible, target_tp), divisible, heads)


# ------------------------------------------------------------------------- building a rank


def _target_shape(name: str, local_shape, plan: ReshardPlan, source) -> Tuple[int, ...]:
    shape = list(local_shape)
    spec = shard_spec(name)
    if spec is not None:
        full = plan.rows(name) or shape[spec.dim] * plan.source_tp
        if full % plan.target_tp:
            raise CheckpointError(f"{source.file(0)}: {name}: size {full} of dim {spec.dim} is "
                                  f"not divisible by tensor-parallel size {plan.target_tp}")
        shape[spec.dim] = full // plan.target_tp
    return tuple(shape)


def shard_tensor(source, plan: ReshardPlan, name: str, rank: int, get):
    """Target ``rank``'s slice of the tensor ``get(r)`` (source rank ``r``'s) split like ``name``.

    Returns a tensor, or with ``plan.lazy`` a :class:`LazyTensor` that computes it when written
    (its shape and dtype are known, and checked, up front).
    """
    pieces = {}

    def piece(r):
        if r not in pieces:
            pieces[r] = get(r)
        return pieces[r]

    def compute() -> torch.Tensor:
        try:
            out = target_shard(name, piece, plan.source_tp, plan.target_tp, rank,
                               rows=plan.rows(name), spec=shard_spec(name))
        except ValueError as error:
            raise CheckpointError(f"{source.file(0)}: {error}") from error
        source.release_pages(*pieces.values())
        pieces.clear()
        return out

    if not plan.lazy:
        return compute()
    first = get(0)  # metadata only: a memory-mapped tensor is not read for its shape
    return LazyTensor(_target_shape(name, first.shape, plan, source), first.dtype, compute)


def build_model_shard(source, plan: ReshardPlan, rank: int) -> StateDict:
    """Target ``rank``'s flat model state dict."""
    return {name: shard_tensor(source, plan, name, rank, lambda r, n=name: source.model(r)[n])
            for name in plan.names}
