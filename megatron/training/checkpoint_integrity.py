"""Integrity records of checkpoint directories: every shard's size and SHA-256.

``checkpoint_integrity.json`` is the last file written into a checkpoint directory (by a save
or a checkpoint tool); a load checks its shard against it, so a truncated or corrupt file is
named by path instead of failing somewhere inside ``torch.load``. The name is not
``metadata.json`` on purpose: Megatron-LM takes a directory holding that file for a distributed
(torch_dist) checkpoint.
"""

import hashlib
import json
import os
from typing import Any, Dict, Optional

__all__ = ["INTEGRITY_FILENAME", "CheckpointError", "file_digest", "verify_checkpoint_file",
           "write_integrity_record", "write_json_atomically"]

INTEGRITY_FILENAME = "checkpoint_integrity.json"
INTEGRITY_FORMAT = "megatron-bert checkpoint integrity 1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and the reason."""


def file_digest(path: str) -> Dict[str, Any]:
    """``{"bytes", "sha256"}`` of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def write_json_atomically(path: str, value: dict) -> None:
    """Write ``value`` to ``path`` through a fsynced temporary file and ``os.replace``."""
    with open(path + ".tmp", "w") as handle:
        json.dump(value, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(path + ".tmp", path)


def write_integrity_record(directory: str, iteration: int,
                           files: Optional[Dict[str, Dict[str, Any]]] = None) -> str:
    """Write ``checkpoint_integrity.json`` into a checkpoint directory (its last file).

    Args:
        directory: an ``iter_XXXXXXX`` (or ``release``, or staging) directory.
        iteration: the checkpoint's iteration.
        files: ``{relative path: {"bytes", "sha256"}}``; computed from every
            ``mp_rank_*/model_optim_rng.pt`` in ``directory`` when not given (tools use this).

    Returns:
        The path of the record.
    """
    if files is None:
        files = {}
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name, "model_optim_rng.pt")
            if name.startswith("mp_rank_") and os.path.isfile(path):
                files[f"{name}/model_optim_rng.pt"] = file_digest(path)
    record = {"format": INTEGRITY_FORMAT, "iteration": iteration,
              "tensor_model_parallel_size": len(files), "files": files}
    path = os.path.join(directory, INTEGRITY_FILENAME)
    write_json_atomically(path, record)
    return path


def verify_checkpoint_file(directory: str, relative_path: str, check_hash: bool = True) -> bool:
    """Check one file of a checkpoint against the directory's integrity record.

    Args:
        directory: the checkpoint's iteration directory.
        relative_path: e.g. ``mp_rank_01/model_optim_rng.pt``.
        check_hash: also compare the SHA-256 (reads the file once more); ``False`` checks the
            size only, which catches truncation (the checkpoint tools, whose time budget is
            one read and one write of the files).

    Returns:
        ``True`` when verified, ``False`` when the directory has no record (a checkpoint written
        by Megatron-LM or an older version: nothing to verify against).

    Raises:
        CheckpointError: naming the file when it is missing, truncated or corrupt, or the record
            unreadable.
    """
    record_path = os.path.join(directory, INTEGRITY_FILENAME)
    if not os.path.isfile(record_path):
        return False
    try:
        with open(record_path) as handle:
            expected = json.load(handle)["files"][relative_path]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{record_path} is unreadable or has no entry for "
                              f"{relative_path}: {type(error).__name__}: {error}") from None
    path = os.path.join(directory, relative_path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} does not exist ({record_path} lists it)")
    size = os.path.getsize(path)
    if size != expected["bytes"]:
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt: {size} bytes, "
                              f"{expected['bytes']} when saved")
    if check_hash and file_digest(path)["sha256"] != expected["sha256"]:
        raise CheckpointError(f"checkpoint file {path} is corrupt: its SHA-256 differs from the "
                              f"one recorded when it was saved ({record_path})")
    return True
