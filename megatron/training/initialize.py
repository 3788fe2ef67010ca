"""Start-up: the process group (from torchrun's environment), model-parallel groups and seeds."""

import datetime
import logging
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from megatron import mpu

__all__ = ["default_backend", "get_device", "initialize_megatron", "set_random_seed"]

logger = logging.getLogger(__name__)


def default_backend() -> str:
    """``nccl`` when CUDA is available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def get_device(backend: str, local_rank: int = 0) -> torch.device:
    """The device this rank computes on: its local GPU for NCCL, the CPU for gloo."""
    if backend == "nccl":
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def set_random_seed(seed: int) -> None:
    """Seed Python, NumPy and torch identically on every rank, and the tensor-parallel streams.

    Every data-parallel replica draws the same dropout masks (on different data), as in
    Megatron-LM; tensor-parallel ranks draw different masks inside their shards.
    """
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    mpu.model_parallel_manual_seed(seed)


def _init_process_group(backend: str, timeout_minutes: float, local_rank: int) -> None:
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if "MASTER_ADDR" in os.environ:  # launched by torchrun (or by hand with env://)
        dist.init_process_group(backend, timeout=timeout)
    else:  # a plain single process
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)


def initialize_megatron(*, tensor_model_parallel_size: int, seed: int,
                        distributed_backend: str = None, distributed_timeout_minutes: float = 10.0,
                        local_rank: int = None) -> torch.device:
    """Initialise ``torch.distributed`` (unless already done), mpu's groups and the seeds.

    Args:
        tensor_model_parallel_size: ranks each layer is split over.
        seed: random seed.
        distributed_backend: ``nccl`` or ``gloo`` (default: :func:`default_backend`).
        distributed_timeout_minutes: how long any collective (of the world and of the tensor- and
            data-parallel groups) waits for a peer before failing instead of hanging.
        local_rank: this process's index on its node (default: ``LOCAL_RANK``).

    Returns:
        The device this rank computes on.

    Raises:
        RuntimeError: if CUDA is asked for but missing, or model parallelism was initialised
            with another size.
    """
    backend = distributed_backend or default_backend()
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("--distributed-backend nccl needs CUDA, which is not available; "
                           "use --distributed-backend gloo to train on the CPU")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        _init_process_group(backend, distributed_timeout_minutes, local_rank)
    elif dist.get_backend() != backend:
        backend = dist.get_backend()
    if mpu.model_parallel_is_initialized():
        size = mpu.get_tensor_model_parallel_world_size()
        if size != tensor_model_parallel_size:
            raise RuntimeError(f"model parallelism is initialised with size {size}, not "
                               f"{tensor_model_parallel_size}")
    else:
        mpu.initialize_model_parallel(
            tensor_model_parallel_size,
            timeout=datetime.timedelta(minutes=distributed_timeout_minutes))
    set_random_seed(seed)
    logger.info("initialised: world size %d, tensor-parallel %d, data-parallel %d, backend %s",
                dist.get_world_size(), tensor_model_parallel_size,
                mpu.get_data_parallel_world_size(), backend)
    return get_device(backend, local_rank)
