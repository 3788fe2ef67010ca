"""Broadcast a batch from the first rank of each tensor-parallel group to the others."""

from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron.mpu.parallel_state import group_rank, group_size, resolve_tensor_model_parallel_group

__all__ = ["broadcast_data"]

_MAX_DATA_DIM = 8
_BAD_INPUT = -1  # sent in place of a size so that the receivers fail instead of hanging


def _communication_device(group: dist.ProcessGroup) -> torch.device:
    """CPU for gloo; the current accelerator for backends that need device tensors (NCCL)."""
    if dist.get_backend(group) == "gloo" or not torch.accelerator.is_available():
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def _check_source_data(keys: Sequence[str], data, datatype: torch.dtype) -> Optional[str]:
    if data is None:
        return "data is None on the source rank"
    for key in keys:
        if key not in data:
            return f"key {key!r} is missing (have {sorted(data)})"
        value = data[key]
        if not torch.is_tensor(value):
            return f"key {key!r} is a {type(value).__name__}, not a tensor"
        if value.dtype != datatype:
            return f"key {key!r} has dtype {value.dtype}, expected {datatype}"
        if value.dim() > _MAX_DATA_DIM:
            return f"key {key!r} has {value.dim()} dimensions, at most {_MAX_DATA_DIM} supported"
    return None


def broadcast_data(
    keys: Sequence[str],
    data: Optional[Dict[str, torch.Tensor]],
    datatype: torch.dtype,
    *,
    process_group: Optional[dist.ProcessGroup] = None,
) -> Dict[str, torch.Tensor]:
    """Send ``data[key]`` for every key from tensor-parallel rank 0 to the rest of its group.

    Only the source rank needs ``data`` (others may pass ``None``). Shapes travel first (one
    broadcast), then all tensors flattened into one buffer (a second broadcast). If the source's
    data is invalid, every rank raises instead of the receivers waiting forever.

    Args:
        keys: names of the tensors, in the same order on every rank.
        data: ``{key: tensor}`` on the source rank.
        datatype: dtype every tensor must have.
        process_group: tensor-parallel group (default: the initialised one, or none).

    Returns:
        ``{key: tensor}`` on every rank (on the CPU for gloo, the accelerator for NCCL).

    Raises:
        ValueError: if the source's data lacks a key or has the wrong dtype.
    """
    group = resolve_tensor_model_parallel_group(process_group)
    is_source = group_rank(group) == 0
    problem = _check_source_data(keys, data, datatype) if is_source else None
    if group_size(group) == 1:
        if problem:
            raise ValueError(f"broadcast_data: {problem}")
        return {key: data[key] for key in keys}

    device = _communication_device(group)
    source = dist.get_global_rank(group, 0)
    sizes = torch.zeros(len(keys), _MAX_DATA_DIM + 1, dtype=torch.int64)  # [keys, ndim + dims]
    if is_source:
        if problem:
            sizes.fill_(_BAD_INPUT)
        else:
            for row, key in enumerate(keys):
                shape = data[key].shape
                sizes[row, 0] = len(shape)
                sizes[row, 1 : 1 + len(shape)] = torch.tensor(shape, dtype=torch.int64)
    sizes = sizes.to(device)
    dist.broadcast(sizes, source, group=group)
    sizes = sizes.cpu()
    if bool((sizes == _BAD_INPUT).all()):
        reason = problem or f"the source rank {source} sent invalid data"
        raise ValueError(f"broadcast_data: {reason}")

    shapes: List[List[int]] = [
        sizes[row, 1 : 1 + int(sizes[row, 0])].tolist() for row in range(len(keys))
    ]
    numels = [int(torch.Size(shape).numel()) for shape in shapes]
    if is_source:
        flat = torch.cat([data[key].reshape(-1) for key in keys]).to(device)
    else:
        flat = torch.empty(sum(numels), dtype=datatype, device=device)
    dist.broadcast(flat, source, group=group)

    output = {}
    for key, shape, part in zip(keys, shapes, torch.split(flat, numels)):
        output[key] = part.view(shape)
    return output
