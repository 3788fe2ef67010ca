"""Graceful stop on a signal (``--exit-signal-handler``), agreed on by every rank.

Schedulers (Slurm, Kubernetes, torchrun's agent) send SIGTERM some seconds before they kill a
job. The handler only notes the signal; the training loop asks :meth:`stop_requested` once per
iteration, which all-reduces the note over the world, so every rank finishes the same iteration,
then saves the same checkpoint, then exits. A rank that got no signal itself (the scheduler
signalled only some processes) still stops with the others.
"""

import logging
import signal
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["DistributedSignalHandler"]

logger = logging.getLogger(__name__)


class DistributedSignalHandler:
    """Context manager: while active, ``sig`` requests a stop instead of killing the process.

    Args:
        sig: the signal to catch (SIGTERM, as Megatron-LM).
        group: process group to agree over (default: the world, when initialised).
    """

    def __init__(self, sig: int = signal.SIGTERM, group: Optional[dist.ProcessGroup] = None):
        self.sig = sig
        self.group = group
        self.received = False
        self._previous = None

    def __enter__(self) -> "DistributedSignalHandler":
        self.received = False
        self._previous = signal.signal(self.sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(self.sig, self._previous)

    def _handle(self, signum, frame) -> None:
        if not self.received:
            logger.warning("received %s: stopping after this iteration and saving a checkpoint",
                           signal.Signals(signum).name)
        self.received = True

    def stop_requested(self, device: Optional[torch.device] = None) -> bool:
        """True on every rank when any rank has received the signal (collective).

        Args:
            device: where the flag is reduced (the accelerator for NCCL; default CPU).
        """
        flag = torch.tensor([float(self.received)], device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
