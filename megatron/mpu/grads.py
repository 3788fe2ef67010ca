"""Gradient-norm clipping for parameters sharded over the tensor-parallel group."""

import math
from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist

from megatron.mpu.layers import param_is_not_tensor_parallel_duplicate
from megatron.mpu.parallel_state import group_size, resolve_tensor_model_parallel_group

__all__ = ["clip_grad_norm"]


def _sum_of_powers(grads, norm_type: float, device: torch.device) -> torch.Tensor:
    """``sum(|g| ** norm_type)`` over every element of ``grads``, in float32.

    Each tensor is reduced with ``torch.sum`` (pairwise summation) rather than with torch's
    norm kernels: on the CPU those accumulate a 2M-element embedding gradient with a relative
    error near 3e-4, which made the norm (and so clipping) depend on how the tensor is sharded.
    """
    total = torch.zeros((), device=device, dtype=torch.float32)
    for grad in grads:
        grad = grad.float()
        power = grad * grad if norm_type == 2.0 else grad.abs().pow(norm_type)
        total = total + power.sum().to(device)
    return total


def clip_grad_norm(
    parameters: Union[torch.Tensor, Iterable[torch.Tensor]],
    max_norm: float,
    norm_type: float = 2.0,
    *,
    process_group: Optional[dist.ProcessGroup] = None,
) -> float:
    """Clip gradients in place so that their global norm is at most ``max_norm``.

    The norm is that of the full (unsharded) model: every sharded parameter
    (``tensor_model_parallel=True``) counts its shard on each rank; every replicated parameter
    counts once, on tensor-parallel rank 0. Local sums are all-reduced over the tensor-parallel
    group (MAX for the infinity norm), so every rank returns the same norm and scales by the same
    factor. Data-parallel replicas are expected to hold identical (already reduced) gradients.

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
    norm_type = float(norm_type)
    if not norm_type > 0:
        raise ValueError(f"norm_type must be positive, got {norm_type}")
    group = resolve_tensor_model_parallel_group(process_group)

    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    counted = [p.grad for p in params if param_is_not_tensor_parallel_duplicate(p, group)]
    device = grads[0].device if grads else torch.device("cpu")

    if math.isinf(norm_type):
        total = (torch.nn.utils.get_total_norm(counted, norm_type).to(device, torch.float32)
                 if counted else torch.zeros((), device=device))
        if group_size(group) > 1:
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
    else:
        total = _sum_of_powers(counted, norm_type, device)
        if group_size(group) > 1:
            dist.all_reduce(total, group=group)
        total = total.pow(1.0 / norm_type)

    total_norm = float(total)
    if params and math.isfinite(total_norm) and max_norm / (total_norm + 1.0e-6) < 1.0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total_norm
