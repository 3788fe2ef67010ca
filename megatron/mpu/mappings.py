"""Autograd-aware communication at the borders of tensor-parallel regions.

Each public function is one ``torch.autograd.Function`` whose forward and backward are conjugate:

=========================================  ====================  ====================
function                                   forward               backward
=========================================  ====================  ====================
``copy_to_tensor_model_parallel_region``   identity              all-reduce (sum)
``reduce_from_tensor_model_parallel_region``  all-reduce (sum)   identity
``scatter_to_tensor_model_parallel_region``   split last dim     all-gather last dim
``gather_from_tensor_model_parallel_region``  all-gather last dim  split last dim
=========================================  ====================  ====================

The private helpers return their input untouched for a group of one, so the single-process path
costs nothing. All-reduces work on a fresh buffer: autograd may hand the same gradient tensor to
several nodes, and an in-place reduction would corrupt the others.
"""

from typing import Optional

import torch
import torch.distributed as dist

from megatron.mpu.parallel_state import group_rank, group_size, resolve_tensor_model_parallel_group
from megatron.mpu.utils import divide

__all__ = [
    "copy_to_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region",
    "gather_from_tensor_model_parallel_region",
]


def _reduce(input_: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Sum ``input_`` over ``group`` into a new tensor."""
    if group_size(group) == 1:
        return input_
    output = input_.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(output, group=group)
    return output


def _split_along_last_dim(input_: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Keep this rank's contiguous slice of the last dimension."""
    world_size = group_size(group)
    if world_size == 1:
        return input_
    last = divide(input_.size(-1), world_size, "last dimension / tensor_model_parallel_size")
    start = group_rank(group) * last
    return input_[..., start : start + last].contiguous()


def _gather_along_last_dim(
    input_: torch.Tensor, group: Optional[dist.ProcessGroup]
) -> torch.Tensor:
    """Concatenate every rank's ``input_`` along the last dimension, in rank order."""
    world_size = group_size(group)
    if world_size == 1:
        return input_
    input_ = input_.contiguous()
    parts = [torch.empty_like(input_) for _ in range(world_size)]
    dist.all_gather(parts, input_, group=group)
    return torch.cat(parts, dim=-1)


class _CopyToModelParallelRegion(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce the gradient."""

    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return input_

    @staticmethod
    def backward(ctx, grad_output):
        return _reduce(grad_output, ctx.group), None


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    """Forward: all-reduce. Backward: identity."""

    @staticmethod
    def forward(ctx, input_, group):
        return _reduce(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


class _ScatterToModelParallelRegion(torch.autograd.Function):
    """Forward: keep this rank's chunk of the last dimension. Backward: all-gather."""

    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return _split_along_last_dim(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        return _gather_along_last_dim(grad_output, ctx.group), None


class _GatherFromModelParallelRegion(torch.autograd.Function):
    """Forward: all-gather along the last dimension. Backward: keep this rank's chunk."""

    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return _gather_along_last_dim(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        return _split_along_last_dim(grad_output, ctx.group), None


def copy_to_tensor_model_parallel_region(
    input_: torch.Tensor, process_group: Optional[dist.ProcessGroup] = None
) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, all-reduce of the gradient backward."""
    group = resolve_tensor_model_parallel_group(process_group)
    if group_size(group) == 1:
        return input_
    return _CopyToModelParallelRegion.apply(input_, group)


def reduce_from_tensor_model_parallel_region(
    input_: torch.Tensor, process_group: Optional[dist.ProcessGroup] = None
) -> torch.Tensor:
    """Leave a tensor-parallel region by summing partial results: all-reduce forward only."""
    group = resolve_tensor_model_parallel_group(process_group)
    if group_size(group) == 1:
        return input_
    return _ReduceFromModelParallelRegion.apply(input_, group)


def scatter_to_tensor_model_parallel_region(
    input_: torch.Tensor, process_group: Optional[dist.ProcessGroup] = None
) -> torch.Tensor:
    """Split the last dimension over ranks (no communication); all-gather in backward."""
    group = resolve_tensor_model_parallel_group(process_group)
    if group_size(group) == 1:
        return input_
    return _ScatterToModelParallelRegion.apply(input_, group)


def gather_from_tensor_model_parallel_region(
    input_: torch.Tensor, process_group: Optional[dist.ProcessGroup] = None
) -> torch.Tensor:
    """Concatenate the last dimension from all ranks; split (no communication) in backward."""
    group = resolve_tensor_model_parallel_group(process_group)
    if group_size(group) == 1:
        return input_
    return _GatherFromModelParallelRegion.apply(input_, group)
