"""Turning failures into one clear line and a non-zero exit, for the entry scripts.

``with exit_on_error("pretrain_bert.py"):`` around an entry script's ``main()``:

- our own errors (bad flags or inputs, unreadable checkpoints, a diverged run) become
  ``pretrain_bert.py: error: <message>`` on stderr and exit status 1, with no traceback;
- a collective that fails because a peer process died or stopped responding (within
  ``--distributed-timeout-minutes``) becomes a message naming the ranks that are gone, found by
  a census through the job's rendezvous store, and exit status 1, instead of a hang or a wall of
  C++ frames. torchrun (``--max-restarts``) can then restart the job, which resumes from the
  last checkpoint with ``--load``.

Anything else is a bug and keeps its traceback.
"""

import contextlib
import logging
import sys
import time
from typing import Iterator, List, Optional, Tuple, Type

import torch.distributed as dist

__all__ = ["exit_on_error", "missing_ranks"]

logger = logging.getLogger(__name__)

_CENSUS_KEY = "megatron-bert/census/{rank}"
_CENSUS_WAIT_S = 5.0


def _user_errors() -> Tuple[Type[BaseException], ...]:
    from megatron.training.arguments import ArgumentError
    from megatron.training.checkpointing import CheckpointError

    return (ArgumentError, CheckpointError, ValueError, FloatingPointError, FileNotFoundError,
            IsADirectoryError, NotADirectoryError, PermissionError)


def _is_distributed_failure(error: BaseException) -> bool:
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(marker in text for marker in (
        "gloo", "nccl", "connection closed by peer", "connection reset by peer",
        "timed out", "broken pipe", "socket"))


def missing_ranks(wait_s: float = _CENSUS_WAIT_S) -> Optional[List[int]]:
    """After a failed collective: the ranks that did not answer a census within ``wait_s``.

    Every surviving rank writes its key into the rendezvous store (torchrun's agent, or the
    store the job started with, outlives the workers) and looks for the others'. Returns
    ``None`` when there is no store to ask.
    """
    try:
        store = dist.distributed_c10d._get_default_store()
        rank, world_size = dist.get_rank(), dist.get_world_size()
    except Exception:  # no process group, or it is gone: nothing to ask
        return None
    try:
        store.set(_CENSUS_KEY.format(rank=rank), "alive")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(world_size)
                       if not store.check([_CENSUS_KEY.format(rank=r)])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)
    except Exception:  # the store itself went away with a dead rank
        return None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


def _distributed_message(error: BaseException) -> str:
    try:
        me = f"rank {dist.get_rank()} of {dist.get_world_size()}"
    except Exception:
        me = "this rank"
    gone = missing_ranks()
    if gone:
        who = f"rank{'s' if len(gone) > 1 else ''} {', '.join(map(str, gone))} vanished or " \
              "stopped responding"
    else:
        who = "a peer process vanished or stopped responding"
    return (f"{who}; {me} stops ({type(error).__name__}: {_first_line(error)}). Restart the "
            "job (torchrun --max-restarts) with --load to resume from the last checkpoint.")


@contextlib.contextmanager
def exit_on_error(prog: str) -> Iterator[None]:
    """Exit with ``prog: error: ...`` and status 1 on user errors and distributed failures."""
    try:
        yield
    except _user_errors() as error:
        logger.debug("stopping on %r", error, exc_info=True)
        sys.stderr.write(f"{prog}: error: {error}\n")
        sys.exit(1)
    except RuntimeError as error:
        if not _is_distributed_failure(error):
            raise
        logger.debug("distributed failure", exc_info=True)
        sys.stderr.write(f"{prog}: error: {_distributed_message(error)}\n")
        sys.exit(1)
