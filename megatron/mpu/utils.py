"""Small helpers shared by the tensor-parallel modules: checked division and tensor splitting."""

from typing import Sequence, Tuple

import torch

__all__ = [
    "ensure_divisibility",
    "divide",
    "split_tensor_along_last_dim",
    "split_tensor_along_dim_with_stride",
    "merge_partitions_with_stride",
    "VocabUtility",
]


def ensure_divisibility(numerator: int, denominator: int, what: str = "") -> None:
    """Raise ``ValueError`` unless ``numerator`` is divisible by ``denominator``.

    Args:
        numerator: the size to split.
        denominator: the number of parts.
        what: optional description of the two numbers, used in the message
            (e.g. ``"output_size / tensor_model_parallel_size"``).

    Raises:
        ValueError: naming both values when the division leaves a remainder.
    """
    if denominator <= 0 or numerator % denominator != 0:
        prefix = f"{what}: " if what else ""
        raise ValueError(f"{prefix}{numerator} is not divisible by {denominator}")


def divide(numerator: int, denominator: int, what: str = "") -> int:
    """Return ``numerator // denominator`` after checking that it divides exactly."""
    ensure_divisibility(numerator, denominator, what)
    return numerator // denominator


def split_tensor_along_last_dim(
    tensor: torch.Tensor, num_partitions: int, contiguous_split_chunks: bool = False
) -> Tuple[torch.Tensor, ...]:
    """Split ``tensor`` into ``num_partitions`` equal chunks along its last dimension.

    Args:
        tensor: the tensor to split.
        num_partitions: number of chunks; must divide the last dimension.
        contiguous_split_chunks: return contiguous copies instead of views.

    Returns:
        A tuple of ``num_partitions`` tensors.
    """
    last_dim_size = divide(tensor.size(-1), num_partitions, "last dimension / num_partitions")
    chunks = torch.split(tensor, last_dim_size, dim=-1)
    if contiguous_split_chunks:
        return tuple(chunk.contiguous() for chunk in chunks)
    return chunks


def split_tensor_along_dim_with_stride(
    tensor: torch.Tensor, dim: int, num_partitions: int, rank: int, stride: int = 1
) -> torch.Tensor:
    """Return the ``rank``-th shard of ``tensor`` along ``dim``, honouring ``stride``.

    With ``stride`` s the dimension is cut into ``num_partitions * s`` equal pieces and rank ``r``
    owns pieces ``r, r + p, r + 2p, ...`` concatenated. ``stride=1`` is a plain contiguous split.
    This is how Megatron lays out a fused weight such as ``[A | B]`` so that each rank holds its
    slice of both halves.

    Raises:
        ValueError: when the dimension does not split evenly.
    """
    size = tensor.size(dim)
    piece = divide(size, num_partitions * stride, f"size {size} of dim {dim} / (partitions*stride)")
    pieces = torch.split(tensor, piece, dim=dim)
    mine: Sequence[torch.Tensor] = pieces[rank::num_partitions]
    return torch.cat(list(mine), dim=dim).contiguous()


def merge_partitions_with_stride(
    shards: Sequence[torch.Tensor], dim: int, stride: int = 1
) -> torch.Tensor:
    """Inverse of :func:`split_tensor_along_dim_with_stride`: rebuild the full tensor.

    Args:
        shards: every rank's shard, in rank order.
        dim: the partition dimension.
        stride: the partition stride the shards were made with.
    """
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    # Piece k of the full tensor (of p * stride pieces) is piece k // p of rank k % p.
    ordered = [pieces[k % len(shards)][k // len(shards)] for k in range(len(shards) * stride)]
    return torch.cat(ordered, dim=dim)


class VocabUtility:
    """Vocabulary ranges owned by a rank: ``[first, last)`` of a vocabulary split over ranks."""

    @staticmethod
    def vocab_range_from_per_partition_vocab_size(
        per_partition_vocab_size: int, rank: int, world_size: int
    ) -> Tuple[int, int]:
        del world_size  # kept for Megatron's signature
        index_f = rank * per_partition_vocab_size
        return index_f, index_f + per_partition_vocab_size

    @staticmethod
    def vocab_range_from_global_vocab_size(
        global_vocab_size: int, rank: int, world_size: int
    ) -> Tuple[int, int]:
        per_partition = divide(
            global_vocab_size, world_size, "vocabulary size / tensor_model_parallel_size"
        )
        return VocabUtility.vocab_range_from_per_partition_vocab_size(
            per_partition, rank, world_size
        )
