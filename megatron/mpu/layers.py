"""Tensor-parallel layers: column- and row-parallel linear, vocabulary-parallel embedding.

Every layer takes an optional ``process_group``; without one it uses the tensor-parallel group
from :func:`megatron.mpu.initialize_model_parallel`, and with nothing initialised in a single
process it computes exactly what ``nn.Linear`` / ``nn.Embedding`` compute.

Weights are initialised by drawing the *full* master weight on the CPU from the default
generator (identical on every rank after :func:`megatron.mpu.model_parallel_manual_seed`) and
keeping this rank's slice, so a model starts bit-identical at every tensor-parallel size.
"""

from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron.mpu.mappings import (
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.mpu.parallel_state import (
    group_rank,
    group_size,
    resolve_tensor_model_parallel_group,
)
from megatron.mpu.utils import VocabUtility, divide, split_tensor_along_dim_with_stride

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "set_tensor_model_parallel_attributes",
    "set_defaults_if_not_set_tensor_model_parallel_attributes",
    "copy_tensor_model_parallel_attributes",
    "param_is_not_tensor_parallel_duplicate",
    "linear_with_grad_async_allreduce",
]

InitMethod = Callable[[torch.Tensor], torch.Tensor]

_MODEL_PARALLEL_ATTRIBUTE_DEFAULTS = {
    "tensor_model_parallel": False,
    "partition_dim": -1,
    "partition_stride": 1,
}


def set_tensor_model_parallel_attributes(
    tensor: torch.Tensor, is_parallel: bool, dim: int, stride: int
) -> None:
    """Tag ``tensor`` with how it is sharded (read by clipping, checkpoint resharding, tools)."""
    tensor.tensor_model_parallel = is_parallel
    tensor.partition_dim = dim
    tensor.partition_stride = stride


def set_defaults_if_not_set_tensor_model_parallel_attributes(tensor: torch.Tensor) -> None:
    """Tag ``tensor`` as replicated unless it already carries sharding attributes."""
    for attribute, value in _MODEL_PARALLEL_ATTRIBUTE_DEFAULTS.items():
        if not hasattr(tensor, attribute):
            setattr(tensor, attribute, value)


def copy_tensor_model_parallel_attributes(destination: torch.Tensor, source: torch.Tensor) -> None:
    """Copy the sharding attributes of ``source`` onto ``destination`` (e.g. fp32 master copies)."""
    for attribute, value in _MODEL_PARALLEL_ATTRIBUTE_DEFAULTS.items():
        setattr(destination, attribute, getattr(source, attribute, value))


def param_is_not_tensor_parallel_duplicate(
    param: torch.Tensor, process_group: Optional[dist.ProcessGroup] = None
) -> bool:
    """True for sharded parameters, and for replicated ones on tensor-parallel rank 0 only.

    Summing a quantity over the parameters for which this is true, then over the tensor-parallel
    group, counts every sharded parameter once and every replicated one once.
    """
    if getattr(param, "tensor_model_parallel", False):
        return True
    return group_rank(resolve_tensor_model_parallel_group(process_group)) == 0


def _initialize_affine_weight(
    weight: torch.Tensor,
    full_shape: Tuple[int, int],
    partition_dim: int,
    init_method: InitMethod,
    stride: int,
    rank: int,
    world_size: int,
    return_master_weight: bool,
) -> Optional[torch.Tensor]:
    """Fill ``weight`` with this rank's slice of a full master weight drawn by ``init_method``.

    The master weight is drawn in fp32 on the CPU, so its values do not depend on the device, the
    parameter dtype or the number of ranks.
    """
    set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=partition_dim, stride=stride)
    master_weight = torch.empty(full_shape, dtype=torch.float32, device="cpu")
    init_method(master_weight)
    shard = split_tensor_along_dim_with_stride(
        master_weight, partition_dim, world_size, rank, stride
    )
    with torch.no_grad():
        weight.copy_(shard.to(dtype=weight.dtype))
    return master_weight if return_master_weight else None


class _ColumnParallelLinearFunction(torch.autograd.Function):
    """``Y = X A^T + b`` whose input gradient is all-reduced while the weight gradient computes.

    Equivalent to ``F.linear(copy_to_tensor_model_parallel_region(X), A, b)``, with the backward
    all-reduce of ``dL/dX`` started asynchronously before ``dL/dA`` is computed, so the
    communication overlaps the second matmul.
    """

    @staticmethod
    def forward(ctx, input_, weight, bias, group):
        ctx.save_for_backward(input_, weight)
        ctx.has_bias = bias is not None
        ctx.group = group
        return F.linear(input_, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input_, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        handle = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.matmul(weight)  # [*, in]
            handle = dist.all_reduce(grad_input, group=ctx.group, async_op=True)
        grad_output_2d = grad_output.reshape(-1, grad_output.size(-1))  # [tokens, out/p]
        if ctx.needs_input_grad[1]:
            input_2d = input_.reshape(-1, input_.size(-1))  # [tokens, in]
            grad_weight = grad_output_2d.t().matmul(input_2d)  # [out/p, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output_2d.sum(dim=0)
        if handle is not None:
            handle.wait()
        return grad_input, grad_weight, grad_bias, None


def linear_with_grad_async_allreduce(
    input_: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    process_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """``F.linear`` on a replicated input with a sharded weight, entering a parallel region.

    The same as ``F.linear(copy_to_tensor_model_parallel_region(input_), weight, bias)``, but the
    backward all-reduce of the input gradient runs while the weight gradient is computed.
    """
    group = resolve_tensor_model_parallel_group(process_group)
    if group_size(group) == 1:
        return F.linear(input_, weight, bias)
    return _ColumnParallelLinearFunction.apply(input_, weight, bias, group)


class ColumnParallelLinear(nn.Module):
    """Linear layer ``Y = XA + b`` with ``A`` split by columns over the tensor-parallel group.

    ``A = [A_1, ..., A_p]`` and rank ``i`` computes ``Y_i = X A_i + b_i``. The weight is stored
    transposed like ``nn.Linear``'s, so this rank's ``weight`` is ``[output_size / p, input_size]``.

    Communication: forward none (plus one all-gather when ``gather_output``), backward one
    all-reduce of ``dL/dX`` (overlapped with the weight-gradient matmul).

    Args:
        input_size: first dimension of ``A``.
        output_size: second dimension of ``A``; must be divisible by the group size.
        bias: add a bias (sharded like the output).
        gather_output: all-gather ``Y`` so every rank gets the full output; otherwise each rank
            returns its ``Y_i`` (what a following :class:`RowParallelLinear` wants).
        init_method: fills the full fp32 master weight in place.
        stride: interleaving of a fused weight (see
            :func:`megatron.mpu.utils.split_tensor_along_dim_with_stride`).
        keep_master_weight_for_test: keep the full master weight as ``self.master_weight``.
        skip_bias_add: do not add the bias; return it instead so the caller can fuse it with the
            next elementwise operation.
        params_dtype: dtype of the parameters.
        device: device of the parameters (default: torch's default device).
        process_group: tensor-parallel group (default: the initialised one, or none).
        perform_initialization: draw the master weight (turn off when loading a checkpoint).

    Returns (from ``forward``):
        ``(output, bias)``: ``bias`` is ``None`` unless ``skip_bias_add``.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = True,
        init_method: InitMethod = nn.init.xavier_normal_,
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        skip_bias_add: bool = False,
        *,
        params_dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
        process_group: Optional[dist.ProcessGroup] = None,
        perform_initialization: bool = True,
    ) -> None:
        super().__init__()
        self.process_group = resolve_tensor_model_parallel_group(process_group)
        world_size = group_size(self.process_group)
        self.input_size = input_size
        self.output_size = output_size
        self.gather_output = gather_output
        self.skip_bias_add = skip_bias_add
        self.output_size_per_partition = divide(
            output_size, world_size, "ColumnParallelLinear output_size / tensor_model_parallel_size"
        )
        self.weight = nn.Parameter(
            torch.empty(self.output_size_per_partition, input_size, dtype=params_dtype,
                        device=device)
        )
        self.master_weight = None
        if perform_initialization:
            self.master_weight = _initialize_affine_weight(
                self.weight, (output_size, input_size), 0, init_method, stride,
                group_rank(self.process_group), world_size, keep_master_weight_for_test,
            )
        else:
            set_tensor_model_parallel_attributes(self.weight, True, 0, stride)
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(self.output_size_per_partition, dtype=params_dtype, device=device)
            )
            set_tensor_model_parallel_attributes(self.bias, True, 0, stride)
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        bias = None if self.skip_bias_add else self.bias
        output_parallel = linear_with_grad_async_allreduce(
            input_, self.weight, bias, self.process_group
        )  # [*, out/p]
        if self.gather_output:
            output = gather_from_tensor_model_parallel_region(output_parallel, self.process_group)
        else:
            output = output_parallel
        return output, (self.bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, output_size={self.output_size}, "
            f"partitions={group_size(self.process_group)}, gather_output={self.gather_output}, "
            f"bias={self.bias is not None}, skip_bias_add={self.skip_bias_add}"
        )


class RowParallelLinear(nn.Module):
    """Linear layer ``Y = XA + b`` with ``A`` split by rows over the tensor-parallel group.

    ``A = [A_1; ...; A_p]`` and ``X = [X_1, ..., X_p]`` (split along its last dimension); rank
    ``i`` computes ``X_i A_i`` and the partial products are summed. This rank's ``weight`` is
    ``[output_size, input_size / p]``; the bias is replicated and added once, after the sum.

    Communication: forward one all-reduce; backward none when ``input_is_parallel`` (the input is
    already the ``X_i`` of a :class:`ColumnParallelLinear`), otherwise one all-gather of
    ``dL/dX``.

    Args:
        input_size: first dimension of ``A``; must be divisible by the group size.
        output_size: second dimension of ``A``.
        bias: add a (replicated) bias.
        input_is_parallel: the input is already split over ranks; otherwise this layer splits it.
        init_method: fills the full fp32 master weight in place.
        stride: interleaving of a fused weight.
        keep_master_weight_for_test: keep the full master weight as ``self.master_weight``.
        skip_bias_add: do not add the bias; return it for the caller to fuse.
        params_dtype, device, process_group, perform_initialization: as for
            :class:`ColumnParallelLinear`.

    Returns (from ``forward``):
        ``(output, bias)``: ``bias`` is ``None`` unless ``skip_bias_add``.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = False,
        init_method: InitMethod = nn.init.xavier_normal_,
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        skip_bias_add: bool = False,
        *,
        params_dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
        process_group: Optional[dist.ProcessGroup] = None,
        perform_initialization: bool = True,
    ) -> None:
        super().__init__()
        self.process_group = resolve_tensor_model_parallel_group(process_group)
        world_size = group_size(self.process_group)
        self.input_size = input_size
        self.output_size = output_size
        self.input_is_parallel = input_is_parallel
        self.skip_bias_add = skip_bias_add
        self.input_size_per_partition = divide(
            input_size, world_size, "RowParallelLinear input_size / tensor_model_parallel_size"
        )
        self.weight = nn.Parameter(
            torch.empty(output_size, self.input_size_per_partition, dtype=params_dtype,
                        device=device)
        )
        self.master_weight = None
        if perform_initialization:
            self.master_weight = _initialize_affine_weight(
                self.weight, (output_size, input_size), 1, init_method, stride,
                group_rank(self.process_group), world_size, keep_master_weight_for_test,
            )
        else:
            set_tensor_model_parallel_attributes(self.weight, True, 1, stride)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=params_dtype, device=device))
            set_tensor_model_parallel_attributes(self.bias, False, -1, 1)
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.input_is_parallel:
            input_parallel = input_
        else:
            input_parallel = scatter_to_tensor_model_parallel_region(input_, self.process_group)
        output_parallel = F.linear(input_parallel, self.weight)  # [*, out], partial sum
        output = reduce_from_tensor_model_parallel_region(output_parallel, self.process_group)
        if self.skip_bias_add or self.bias is None:
            return output, (self.bias if self.skip_bias_add else None)
        return output + self.bias, None

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, output_size={self.output_size}, "
            f"partitions={group_size(self.process_group)}, "
            f"input_is_parallel={self.input_is_parallel}, bias={self.bias is not None}, "
            f"skip_bias_add={self.skip_bias_add}"
        )


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the vocabulary over the tensor-parallel group.

    Rank ``i`` owns rows ``[i * V/p, (i + 1) * V/p)``. Each rank looks up the ids it owns, writes
    zeros for the others, and an all-reduce sums the (disjoint) contributions.

    Communication: forward one all-reduce; backward none.

    Args:
        num_embeddings: vocabulary size ``V`` (already padded); must be divisible by the group
            size.
        embedding_dim: hidden size.
        init_method: fills the full fp32 master table in place.
        params_dtype, device, process_group, perform_initialization: as for
            :class:`ColumnParallelLinear`.
        keep_master_weight_for_test: keep the full master table as ``self.master_weight``.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        init_method: InitMethod = nn.init.xavier_normal_,
        *,
        params_dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
        process_group: Optional[dist.ProcessGroup] = None,
        perform_initialization: bool = True,
        keep_master_weight_for_test: bool = False,
    ) -> None:
        super().__init__()
        self.process_group = resolve_tensor_model_parallel_group(process_group)
        world_size = group_size(self.process_group)
        rank = group_rank(self.process_group)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.vocab_start_index, self.vocab_end_index = (
            VocabUtility.vocab_range_from_global_vocab_size(num_embeddings, rank, world_size)
        )
        self.num_embeddings_per_partition = self.vocab_end_index - self.vocab_start_index
        self.weight = nn.Parameter(
            torch.empty(
                self.num_embeddings_per_partition, embedding_dim, dtype=params_dtype, device=device
            )
        )
        self.master_weight = None
        if perform_initialization:
            self.master_weight = _initialize_affine_weight(
                self.weight, (num_embeddings, embedding_dim), 0, init_method, 1,
                rank, world_size, keep_master_weight_for_test,
            )
        else:
            set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.process_group) == 1:
            return F.embedding(input_ids, self.weight)
        # Ids owned by other ranks look up row 0 and are zeroed; masked_fill also zeroes their
        # gradient, so row 0 receives nothing from them.
        outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
        output_parallel = F.embedding(local_ids, self.weight)  # [*, h]
        output_parallel = output_parallel.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(output_parallel, self.process_group)

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"partitions={group_size(self.process_group)}"
        )
