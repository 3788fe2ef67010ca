"""Checkpoints in Megatron-LM's legacy layout, saved atomically.

Layout (what Megatron-LM, its tools and Hugging Face's Megatron-BERT converter read)::

    {save}/latest_checkpointed_iteration.txt          the iteration number (or "release")
    {save}/iter_{iteration:07d}/mp_rank_{tp:02d}/model_optim_rng.pt

Each file holds ``model`` (nested as :func:`megatron.model.bert_model.nested_state_dict`),
``optimizer``, ``opt_param_scheduler``, ``rng_state`` (one entry per data-parallel rank),
``args``, ``iteration`` and ``checkpoint_version`` (3.0). Only data-parallel rank 0 of each
tensor-parallel group writes.

A save writes every file into ``iter_{iteration:07d}.tmp``, records each file's size and SHA-256
in ``checkpoint_integrity.json`` (written last, by global rank 0), renames that directory into
place and finally rewrites the tracker (through a temporary file and ``os.replace``). A save
interrupted at any point leaves the previous checkpoint and the tracker as they were. A load
verifies its file against the record and names a truncated or corrupt shard by path;
``iteration=`` (``--ckpt-step``) picks an earlier checkpoint. ``keep_last_n`` deletes older
checkpoints only once a newer one is complete and the tracker names it.
"""

import argparse
import logging
import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron import mpu
from megatron.model.bert_model import flat_state_dict, nested_state_dict
from megatron.training.checkpoint_integrity import (
    INTEGRITY_FILENAME,
    CheckpointError,
    file_digest,
    verify_checkpoint_file,
    write_integrity_record,
)

__all__ = [
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "get_checkpoint_name",
    "get_checkpoint_tracker_filename",
    "read_metadata",
    "find_checkpoint",
    "list_checkpoints",
    "write_integrity_record",
    "verify_checkpoint_file",
    "get_rng_state",
    "set_rng_state",
    "save_checkpoint",
    "load_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 3.0
TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
RESHARD_TOOL = "tools/checkpoint_util.py"
_ITERATION_DIR = re.compile(r"^iter_(\d{7,})$")


def get_checkpoint_tracker_filename(checkpoints_path: str) -> str:
    """``{checkpoints_path}/latest_checkpointed_iteration.txt``."""
    return os.path.join(checkpoints_path, TRACKER_FILENAME)


def _iteration_dirname(iteration: int, release: bool = False) -> str:
    return "release" if release else f"iter_{iteration:07d}"


def get_checkpoint_name(checkpoints_path: str, iteration: int, release: bool = False,
                        tensor_rank: int = 0) -> str:
    """Path of the file of tensor-parallel rank ``tensor_rank`` at ``iteration``."""
    return os.path.join(checkpoints_path, _iteration_dirname(iteration, release),
                        f"mp_rank_{tensor_rank:02d}", "model_optim_rng.pt")


def read_metadata(tracker_filename: str) -> Tuple[int, bool]:
    """``(iteration, release)`` from a tracker file.

    Raises:
        CheckpointError: when the file holds neither an iteration number nor ``release``.
    """
    with open(tracker_filename) as handle:
        text = handle.read().strip()
    if text == "release":
        return 0, True
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(f"{tracker_filename}: expected an iteration number or 'release', "
                              f"found {text[:50]!r}") from None
    if iteration < 0:
        raise CheckpointError(f"{tracker_filename}: negative iteration {iteration}")
    return iteration, False


def list_checkpoints(save_dir: str) -> List[int]:
    """Iterations of the complete ``iter_XXXXXXX`` directories in ``save_dir``, ascending."""
    if not os.path.isdir(save_dir):
        return []
    found = (_ITERATION_DIR.match(name) for name in os.listdir(save_dir))
    return sorted(int(match.group(1)) for match in found
                  if match and os.path.isdir(os.path.join(save_dir, match.group(0))))


def _available(load_dir: str) -> str:
    iterations = list_checkpoints(load_dir)
    return ", ".join(map(str, iterations)) if iterations else "none"


def find_checkpoint(load_dir: str, iteration: Optional[int] = None
                    ) -> Optional[Tuple[int, bool, str]]:
    """``(iteration, release, directory)`` of the checkpoint to load.

    Args:
        load_dir: the checkpoint directory.
        iteration: a specific iteration (``--ckpt-step``) instead of the tracker's.

    Returns:
        ``None`` when ``iteration`` is not given and ``load_dir`` has no tracker file.

    Raises:
        CheckpointError: for a tracker (or ``iteration``) naming a directory that does not exist.
    """
    if iteration is not None:
        directory = os.path.join(load_dir, _iteration_dirname(iteration))
        if not os.path.isdir(directory):
            raise CheckpointError(f"--ckpt-step {iteration}: {directory} does not exist "
                                  f"(checkpoints in {load_dir}: {_available(load_dir)})")
        return iteration, False, directory
    tracker = get_checkpoint_tracker_filename(load_dir)
    if not os.path.isfile(tracker):
        return None
    iteration, release = read_metadata(tracker)
    directory = os.path.join(load_dir, _iteration_dirname(iteration, release))
    if not os.path.isdir(directory) and os.path.isdir(directory + ".old"):
        # A re-save of the same iteration was interrupted between its two renames.
        logger.warning("%s is missing; recovering the previous copy %s.old", directory, directory)
        os.replace(directory + ".old", directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{tracker} points at {'release' if release else iteration}, but "
                              f"{directory} does not exist (checkpoints in {load_dir}: "
                              f"{_available(load_dir)}; pick one with --ckpt-step)")
    return iteration, release, directory


def _saved_tensor_parallel_size(directory: str) -> int:
    return len([name for name in os.listdir(directory) if name.startswith("mp_rank_")])


def get_rng_state() -> dict:
    """This rank's Python, NumPy, torch (CPU and accelerator) and tensor-parallel RNG states."""
    state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(),
             "rng_tracker_states": mpu.get_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`get_rng_state`'s output."""
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if "cuda_rng_state" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tracker = state.get("rng_tracker_states", state.get("cuda_rng_tracker_states"))
    if tracker is None:
        raise CheckpointError("the checkpoint's rng_state has no tensor-parallel tracker states")
    mpu.get_rng_tracker().set_states(tracker)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _global_rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _gather_rng_states(data_parallel_group) -> List[dict]:
    state = get_rng_state()
    if data_parallel_group is None or dist.get_world_size(data_parallel_group) == 1:
        return [state]
    states: List[Any] = [None] * dist.get_world_size(data_parallel_group)
    dist.all_gather_object(states, state, group=data_parallel_group)
    return states


def _prune(save_dir: str, keep_last_n: Optional[int], newest: int) -> None:
    """Delete all but the newest ``keep_last_n`` checkpoints (after the tracker names ``newest``)."""
    if not keep_last_n:
        return
    older = [it for it in list_checkpoints(save_dir) if it != newest]
    for iteration in older[:max(0, len(older) - (keep_last_n - 1))]:
        directory = os.path.join(save_dir, _iteration_dirname(iteration))
        shutil.rmtree(directory, ignore_errors=True)
        logger.info("deleted checkpoint %s (--keep-last-n-checkpoints %d)", directory, keep_last_n)


def _remove_leftovers(save_dir: str) -> None:
    """Delete what interrupted saves left: staging directories, and ``.old`` copies of
    checkpoints that were re-saved completely."""
    if not os.path.isdir(save_dir):
        return
    for name in os.listdir(save_dir):
        path = os.path.join(save_dir, name)
        stem, suffix = os.path.splitext(name)
        if not (_ITERATION_DIR.match(stem) and os.path.isdir(path)):
            continue
        if suffix == ".tmp" or (suffix == ".old" and os.path.isdir(os.path.join(save_dir, stem))):
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s, left by an interrupted save", path)


def _publish(save_dir: str, staging: str, final: str, iteration: int) -> None:
    """Rename the staged directory into place, then point the tracker at it (rank 0 only)."""
    if os.path.exists(final):  # saving the same iteration again: swap, then drop the old one
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old)
    else:
        os.replace(staging, final)
    _fsync_directory(save_dir)
    tracker = get_checkpoint_tracker_filename(save_dir)
    with open(tracker + ".tmp", "w") as handle:
        handle.write(str(iteration))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tracker + ".tmp", tracker)
    _fsync_directory(save_dir)


def _fsync_directory(directory: str) -> None:
    """Make renames inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _save_file(state: dict, path: str) -> Dict[str, Any]:
    """``torch.save`` to ``path``, flushed to disk; returns its size and SHA-256."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    return file_digest(path)


def _gather_file_records(record: Optional[Tuple[str, Dict[str, Any]]]) -> Dict[str, Any]:
    """Every writing rank's ``(relative path, digest)``, on every rank."""
    if not _distributed() or dist.get_world_size() == 1:
        return dict([record]) if record else {}
    records: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    return dict(item for item in records if item is not None)


def save_checkpoint(iteration: int, model: torch.nn.Module, optimizer=None,
                    opt_param_scheduler=None, *, save_dir: str,
                    args: Optional[argparse.Namespace] = None, no_save_optim: bool = False,
                    no_save_rng: bool = False, keep_last_n: Optional[int] = None) -> str:
    """Save the model (and optimizer, scheduler, RNG state) at ``iteration``; every rank calls.

    Args:
        keep_last_n: once this checkpoint is complete and the tracker names it, delete all but
            the newest ``keep_last_n`` checkpoints of ``save_dir`` (default: keep all).

    Returns:
        The directory of this checkpoint (``{save_dir}/iter_{iteration:07d}``).
    """
    tp_rank = mpu.get_tensor_model_parallel_rank()
    dp_rank = mpu.get_data_parallel_rank() if mpu.model_parallel_is_initialized() else 0
    dp_group = mpu.get_data_parallel_group() if mpu.model_parallel_is_initialized() else None
    rng_states = None if no_save_rng else _gather_rng_states(dp_group)
    final = os.path.join(save_dir, _iteration_dirname(iteration))
    staging = final + ".tmp"
    if _global_rank() == 0:
        _remove_leftovers(save_dir)
        os.makedirs(staging)
    _barrier()
    record = None
    if dp_rank == 0:
        state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
                 "model": nested_state_dict(model.state_dict())}
        if optimizer is not None and not no_save_optim:
            state["optimizer"] = optimizer.state_dict()
            if opt_param_scheduler is not None:
                state["opt_param_scheduler"] = opt_param_scheduler.state_dict()
        if rng_states is not None:
            state["rng_state"] = rng_states
        relative = f"mp_rank_{tp_rank:02d}/model_optim_rng.pt"
        record = (relative, _save_file(state, os.path.join(staging, relative)))
    files = _gather_file_records(record)  # also the barrier: every file is written
    if _global_rank() == 0:
        write_integrity_record(staging, iteration, files)
        _publish(save_dir, staging, final, iteration)
        logger.info("saved checkpoint at iteration %d to %s", iteration, final)
        _prune(save_dir, keep_last_n, iteration)
    _barrier()
    return final


def _load_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated or foreign files raise many kinds of errors
        raise CheckpointError(f"cannot read checkpoint file {path}: "
                              f"{type(error).__name__}: {error}") from error
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a Megatron checkpoint (no 'model' entry)")
    return state


def _check_tensor_parallel_size(load_dir: str, directory: str, expected: int) -> None:
    saved = _saved_tensor_parallel_size(directory)
    if saved != expected:
        raise CheckpointError(
            f"the checkpoint in {directory} was saved with tensor-model-parallel size {saved}; "
            f"this run uses {expected}. Reshard it first:\n  python {RESHARD_TOOL} --load-dir "
            f"{load_dir} --save-dir {load_dir.rstrip(os.sep)}_tp{expected} "
            f"--target-tensor-parallel-size {expected}")


def load_checkpoint(model: torch.nn.Module, optimizer=None, opt_param_scheduler=None, *,
                    load_dir: str, strict: bool = True, no_load_optim: bool = False,
                    no_load_rng: bool = False, finetune: bool = False,
                    iteration: Optional[int] = None
                    ) -> Tuple[int, Optional[argparse.Namespace]]:
    """Load the latest checkpoint of ``load_dir`` into this rank's model (and optimizer, ...).

    Args:
        model: this rank's model shard.
        optimizer, opt_param_scheduler: restored unless ``no_load_optim`` or ``finetune``.
        load_dir: directory with ``latest_checkpointed_iteration.txt``.
        strict: the model's keys must match the checkpoint's exactly.
        no_load_rng: keep the current RNG state.
        finetune: load the weights only and start from iteration 0.
        iteration: load this iteration (``--ckpt-step``) instead of the tracker's.

    Returns:
        ``(iteration, saved_args)``; ``(0, None)`` when ``load_dir`` has no tracker file.

    Raises:
        CheckpointError: for a tracker naming a missing checkpoint, a missing, truncated or
            corrupt file (checked against the checkpoint's integrity record), or a checkpoint of
            another tensor-parallel size (the message gives the resharding command).
    """
    found = find_checkpoint(load_dir, iteration)
    if found is None:
        logger.warning("no checkpoint tracker %s: starting from scratch",
                       get_checkpoint_tracker_filename(load_dir))
        return 0, None
    iteration, release, directory = found
    _check_tensor_parallel_size(load_dir, directory, mpu.get_tensor_model_parallel_world_size())
    tp_rank = mpu.get_tensor_model_parallel_rank()
    path = get_checkpoint_name(load_dir, iteration, release, tp_rank)
    if not verify_checkpoint_file(directory, f"mp_rank_{tp_rank:02d}/model_optim_rng.pt"):
        logger.info("%s has no %s; loading it unverified", directory, INTEGRITY_FILENAME)
    state = _load_file(path)
    try:
        model.load_state_dict(flat_state_dict(state["model"]), strict=strict)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit this model: {error}") from error
    if finetune or release:
        logger.info("loaded model weights from %s; starting at iteration 0", path)
        return 0, state.get("args")
    if optimizer is not None and not no_load_optim:
        if "optimizer" not in state:
            raise CheckpointError(f"{path} has no optimizer state (saved with --no-save-optim); "
                                  "load it with --no-load-optim or --finetune")
        optimizer.load_state_dict(state["optimizer"])
        if opt_param_scheduler is not None:
            scheduler_state = state.get("opt_param_scheduler", state.get("lr_scheduler"))
            if scheduler_state is not None:
                opt_param_scheduler.load_state_dict(scheduler_state)
    if not no_load_rng:
        _restore_rng(state, path)
    logger.info("loaded checkpoint %s at iteration %d", path, iteration)
    return int(state.get("iteration", iteration)), state.get("args")


def _restore_rng(state: dict, path: str) -> None:
    states = state.get("rng_state")
    if states is None:
        raise CheckpointError(f"{path} has no rng_state (saved with --no-save-rng); load it "
                              "with --no-load-rng")
    if isinstance(states, dict):
        states = [states]
    dp_rank = mpu.get_data_parallel_rank() if mpu.model_parallel_is_initialized() else 0
    if dp_rank >= len(states):
        logger.warning("%s holds RNG states of %d data-parallel ranks; rank %d takes the first",
                       path, len(states), dp_rank)
        dp_rank = 0
    set_rng_state(states[dp_rank])
