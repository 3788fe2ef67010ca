"""Gradient norms and clipping for parameters sharded over the tensor-parallel group."""

import math
from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist

from megatron.mpu.layers import param_is_not_tensor_parallel_duplicate
from megatron.mpu.parallel_state import group_size, resolve_tensor_model_parallel_group

__all__ = ["clip_grad_norm", "get_grad_norm"]


# torch's CPU norm kernels accumulate long tensors with a relative error that grows with their
# length (near 3e-4 for a 2M-element embedding gradient), which made the global norm, and so
# clipping, depend on how a tensor is sharded. Norms are therefore taken over chunks of at most
# this many elements (views, no copies; error below 1e-6 each) in one fused ``_foreach_norm``,
# and the chunk norms combined.
_NORM_CHUNK_NUMEL = 1 << 16


def _sum_of_powers(grads, norm_type: float, device: torch.device) -> torch.Tensor:
    """``sum(|g| ** norm_type)`` over every element of ``grads``, in float32."""
    chunks = [chunk for grad in grads for chunk in grad.reshape(-1).split(_NORM_CHUNK_NUMEL)]
    if not chunks:
        return torch.zeros((), device=device, dtype=torch.float32)
    norms = torch._foreach_norm(chunks, norm_type, dtype=torch.float32)
    return torch.stack([norm.to(device) for norm in norms]).pow(norm_type).sum()


def get_grad_norm(
    parameters: Union[torch.Tensor, Iterable[torch.Tensor]],
    norm_type: float = 2.0,
    *,
    process_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """The global gradient norm of a tensor-parallel model, without changing the gradients.

    Every sharded parameter (``tensor_model_parallel=True``) counts its shard on each rank; every
    replicated parameter counts once, on tensor-parallel rank 0. Local sums are all-reduced over
    the tensor-parallel group (MAX for the infinity norm, one all-reduce either way), so every
    rank returns the same norm.

    Args:
        parameters: parameters (or one tensor); ones without a gradient are ignored.
        norm_type: order of the norm (``2.0``, ``1.0``, ``float('inf')``, ...).
        process_group: tensor-parallel group (default: the initialised one, or none).

    Returns:
        The norm as a float32 scalar tensor on the gradients' device (``inf``/``nan`` when a
        gradient is not finite).

    Raises:
        ValueError: for a non-positive ``norm_type``.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    norm_type = float(norm_type)
    if not norm_type > 0:
        raise ValueError(f"norm_type must be positive, got {norm_type}")
    group = resolve_tensor_model_parallel_group(process_group)
    params = [p for p in parameters if p.grad is not None]
    counted = [p.grad for p in params if param_is_not_tensor_parallel_duplicate(p, group)]
    device = params[0].grad.device if params else torch.device("cpu")
    if math.isinf(norm_type):
        total = (torch.nn.utils.get_total_norm(counted, norm_type).to(device, torch.float32)
                 if counted else torch.zeros((), device=device))
        if group_size(group) > 1:
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
        return total
    total = _sum_of_powers(counted, norm_type, device)
    if group_size(group) > 1:
        dist.all_reduce(total, group=group)
    return total.pow(1.0 / norm_type)


def clip_grad_norm(
    parameters: Union[torch.Tensor, Iterable[torch.Tensor]],
    max_norm: float,
    norm_type: float = 2.0,
    *,
    process_group: Optional[dist.ProcessGroup] = None,
) -> float:
    """Clip gradients in place so that their global norm is at most ``max_norm``.

    The norm is that of the full (unsharded) model, as :func:`get_grad_norm` computes it, so
    every rank scales by the same factor. Data-parallel replicas are expected to hold identical
    (already reduced) gradients.

    Args:
        parameters: parameters (or one tensor) whose ``.grad`` to clip; ones without a gradient
            are ignored.
        max_norm: the largest norm allowed; must be positive.
        norm_type: order of the norm (``2.0``, ``1.0``, ``float('inf')``, ...).
        process_group: tensor-parallel group (default: the initialised one, or none).

    Returns:
        The total norm before clipping, as a Python float (``inf``/``nan`` when a gradient is
        not finite; the gradients are then left unscaled).

    Raises:
        ValueError: for a non-positive ``max_norm`` or ``norm_type``.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    params = [p for p in parameters if p.grad is not None]
    total = get_grad_norm(params, norm_type, process_group=process_group)
    total_norm = float(total)
    if params and math.isfinite(total_norm) and max_norm / (total_norm + 1.0e-6) < 1.0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total_norm
