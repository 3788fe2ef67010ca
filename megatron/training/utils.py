"""Small helpers of the training loop: console output, loss averaging, FLOP counting."""

import logging
import os
import sys
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron import mpu

__all__ = ["average_losses_across_data_parallel_group", "configure_console", "is_last_rank",
           "num_floating_point_operations", "print_rank_0", "unwrap_model"]

# The training console (iteration lines, validation results, where checkpoints went) is a logger
# of its own, so that library code never prints and users can redirect or silence it.
console = logging.getLogger("megatron.training.console")


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))  # before init_process_group under torchrun


def configure_console(stream=None) -> None:
    """Send the training console to ``stream`` (default stdout) unless already configured."""
    if not console.handlers:
        handler = logging.StreamHandler(stream or sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        console.addHandler(handler)
        console.setLevel(logging.INFO)
        console.propagate = False


def print_rank_0(message: str) -> None:
    """Write ``message`` to the training console on global rank 0 only."""
    if _rank() == 0:
        console.info(message)


def is_last_rank() -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return True
    return dist.get_rank() == dist.get_world_size() - 1


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP-style wrappers (which add a ``module`` attribute)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def average_losses_across_data_parallel_group(losses: Dict[str, torch.Tensor],
                                              group: Optional[dist.ProcessGroup] = None
                                              ) -> Dict[str, torch.Tensor]:
    """Average scalar losses over the data-parallel group in one all-reduce."""
    if not losses:
        return {}
    if group is None and mpu.model_parallel_is_initialized():
        group = mpu.get_data_parallel_group()
    stacked = torch.stack([value.detach().float().reshape(()) for value in losses.values()])
    size = mpu.parallel_state.group_size(group)
    if size > 1:
        dist.all_reduce(stacked, group=group)
        stacked /= size
    return dict(zip(losses, stacked))


def num_floating_point_operations(*, num_parameters: int, num_layers: int, hidden_size: int,
                                  seq_length: int, batch_size: int) -> float:
    """Model FLOPs of one training step (forward and backward, no recomputation).

    ``6 * parameters * tokens`` for the matmuls with weights plus ``12 * layers * hidden * seq``
    per token for the attention scores and their weighted sum (forward 2 matmuls of
    ``2 * s * h`` FLOPs per token, backward twice that). The same count as ``bench/``.
    """
    tokens = batch_size * seq_length
    return float(6 * num_parameters * tokens + 12 * num_layers * hidden_size * seq_length * tokens)
