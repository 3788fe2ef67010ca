"""Run a test function in N processes on CPU/gloo, with a timeout instead of a hang.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes from a fork server
that has already imported torch (so each start costs milliseconds, not an import), connects them
through a TCP store that this process opens on a free port, runs ``fn(rank, world_size, *args)``
in each, and re-raises the first failure with its traceback. ``fn`` must be a module-level
function of an importable module.
"""

import collections
import contextlib
import datetime
import time
from typing import Callable, Dict, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 120.0

_forkserver_ready = False


def _use_forkserver() -> None:
    global _forkserver_ready
    if not _forkserver_ready:
        mp.set_forkserver_preload(["torch", "torch.distributed", "megatron.mpu"])
        _forkserver_ready = True


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, threads: int) -> None:
    torch.set_num_threads(threads)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                          timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
        # Keep every rank alive until all are done, so no peer sees a closed connection.
        dist.barrier()
    finally:
        from megatron import mpu

        mpu.destroy_model_parallel()
        dist.destroy_process_group()


def run_distributed(
    fn: Callable, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT_S, threads: int = 1
) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; raise on any failure.

    Raises:
        torch.multiprocessing.ProcessRaisedException: with the failing rank's traceback.
        TimeoutError: if the ranks are not all done within ``timeout`` seconds (they are killed).
    """
    _use_forkserver()
    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
    context = mp.start_processes(
        _worker, args=(world_size, store.port, fn, args, threads), nprocs=world_size,
        join=False, start_method="forkserver",
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=0.5):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{fn.__name__} on {world_size} ranks timed out after {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
        del store


@contextlib.contextmanager
def count_collectives() -> Iterator[Dict[str, int]]:
    """Count the c10d collectives issued inside the block (forward and backward alike).

    Uses PyTorch's own ``CommDebugMode``, which sees every collective that goes through the
    dispatcher, so the count does not depend on how our code calls them. Yields a dict filled on
    exit: ``{"allreduce": 2, "allgather": 1, ...}``.
    """
    from torch.distributed.tensor.debug import CommDebugMode

    counts: Dict[str, int] = collections.Counter()
    with CommDebugMode() as mode:
        yield counts
    for op, n in mode.get_comm_counts().items():
        name = str(op).split(".")[-1].rstrip("_")
        counts[name] += n


__all__ = ["run_distributed", "count_collectives", "DEFAULT_TIMEOUT_S"]
