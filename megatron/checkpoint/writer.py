"""Write checkpoints and exports atomically: everything goes to ``X.tmp`` and is renamed to ``X``.

A tool interrupted at any point, or failing on bad input half-way, leaves no partial output
under the final name: at worst a ``*.tmp`` directory, which the next run replaces.
"""

import contextlib
import logging
import os
import shutil
from typing import Callable, Dict, Iterator, Optional

from megatron.checkpoint.torch_stream import save_streaming
from megatron.training.checkpointing import (
    CheckpointError,
    get_checkpoint_name,
    get_checkpoint_tracker_filename,
    write_integrity_record,
)

__all__ = ["staged_directory", "write_checkpoint", "write_bytes_atomic", "write_text_atomic"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def staged_directory(final: str) -> Iterator[str]:
    """Yield ``final + ".tmp"`` to fill; rename it to ``final`` if the block succeeds.

    Raises:
        CheckpointError: when ``final`` already exists (nothing is overwritten).
    """
    final = final.rstrip(os.sep)
    if os.path.exists(final):
        raise CheckpointError(f"{final} already exists; remove it or choose another directory")
    staging = final + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)  # left over by an interrupted run
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.replace(staging, final)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, ``fsync`` and ``os.replace``."""
    with open(path + ".tmp", "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(path + ".tmp", path)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_checkpoint(save_dir: str, make_state: Callable[[int], dict], tensor_parallel_size: int,
                     iteration: int, release: bool = False,
                     extra_files: Optional[Dict[str, bytes]] = None) -> str:
    """Write a checkpoint in Megatron's layout, one rank at a time.

    ``make_state(rank)`` builds each rank's dict just before it is saved; its
    :class:`~megatron.checkpoint.torch_stream.LazyTensor` s are computed one at a time while the
    file is written (:func:`~megatron.checkpoint.torch_stream.save_streaming`), so at most one
    tensor of the target rank is in memory. Each file is fsynced, their sizes and SHA-256s go
    to ``checkpoint_integrity.json``, the iteration directory is staged as ``*.tmp`` and
    renamed, and the tracker is written last. A new ``save_dir`` is
    staged as a whole.

    Args:
        save_dir: the save directory (must not already hold a checkpoint).
        make_state: ``rank -> state dict`` for ``model_optim_rng.pt``.
        tensor_parallel_size: number of ranks to write.
        iteration: the iteration (ignored for a release checkpoint).
        release: write ``release/`` and a tracker saying ``release``.
        extra_files: ``{name: bytes}`` written next to the tracker (e.g. ``vocab.txt``).

    Returns:
        The directory of the iteration written.

    Raises:
        CheckpointError: when ``save_dir`` already holds a checkpoint.
    """
    tracker = get_checkpoint_tracker_filename(save_dir)
    if os.path.exists(tracker):
        raise CheckpointError(f"{save_dir} already holds a checkpoint ({tracker}); choose "
                              "another --save-dir or remove it")
    if not os.path.isdir(save_dir):
        with staged_directory(save_dir) as staging:
            _write_into(staging, make_state, tensor_parallel_size, iteration, release,
                        extra_files)
    else:
        iteration_dir = os.path.dirname(os.path.dirname(
            get_checkpoint_name(save_dir, iteration, release)))
        shutil.rmtree(iteration_dir, ignore_errors=True)  # orphaned: no tracker points at it
        _write_into(save_dir, make_state, tensor_parallel_size, iteration, release, extra_files)
    final = os.path.dirname(os.path.dirname(get_checkpoint_name(save_dir, iteration, release)))
    logger.debug("wrote %s (tensor-parallel size %d)", final, tensor_parallel_size)
    return final


def _write_into(root: str, make_state: Callable[[int], dict], tensor_parallel_size: int,
                iteration: int, release: bool, extra_files: Optional[Dict[str, bytes]]) -> None:
    iteration_dir = os.path.dirname(os.path.dirname(get_checkpoint_name(root, iteration, release)))
    with staged_directory(iteration_dir) as staging:
        for rank in range(tensor_parallel_size):
            path = os.path.join(staging, f"mp_rank_{rank:02d}", "model_optim_rng.pt")
            os.makedirs(os.path.dirname(path))
            state = make_state(rank)
            with open(path, "wb") as handle:  # fsynced before the rename publishes it
                save_streaming(state, handle, archive_name="model_optim_rng")
            del state
        # Sizes and SHA-256s of the shards, so that --load verifies them (its last file).
        write_integrity_record(staging, 0 if release else iteration)
    for name, data in (extra_files or {}).items():
        write_bytes_atomic(os.path.join(root, name), data)
    write_text_atomic(get_checkpoint_tracker_filename(root), "release" if release else
                      str(iteration))
