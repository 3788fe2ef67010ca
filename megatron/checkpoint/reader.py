"""Open a Megatron checkpoint of any tensor-parallel size: a directory or a release zip.

A :class:`CheckpointSource` finds the files of one iteration, memory-maps them (files in
PyTorch's zip format; older pickle-format files are read whole) and hands out each rank's
state. Tensors read from a mapping can be given back with :meth:`CheckpointSource.release`: on
Linux their pages are dropped from this process (``madvise(MADV_DONTNEED)`` on the read-only
file mapping), so resident memory stays near one tensor per rank however large the checkpoint.

Accepted inputs:

* a save directory with ``latest_checkpointed_iteration.txt`` (or an explicit iteration);
* a zip holding such a directory's content, as NVIDIA's released checkpoints
  (``release/mp_rank_00/model_optim_rng.pt``, optionally the tracker), at any depth.
"""

import contextlib
import ctypes
import logging
import mmap
import os
import pickle
import re
import shutil
import sys
import tempfile
import zipfile
from typing import Dict, List, Optional, Tuple

import torch

from megatron.checkpoint import legacy
from megatron.training.checkpointing import (
    TRACKER_FILENAME,
    CheckpointError,
    find_checkpoint,
    get_checkpoint_name,
    verify_checkpoint_file,
)

__all__ = ["CheckpointSource", "load_state_file"]

logger = logging.getLogger(__name__)

_MEMBER = re.compile(r"^(?P<root>(?:.*/)?)(?P<dir>release|iter_\d{7})/mp_rank_(?P<rank>\d{2})/"
                     r"model_optim_rng\.pt$")
_MADV_DONTNEED = 4


class _Unresolved:
    """Stands in for a class an old checkpoint pickled that no longer exists."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            logger.warning("the checkpoint pickles %s.%s, which cannot be imported; keeping a "
                           "placeholder (only model weights are read from such entries)",
                           module, name)
            return type(name, (_Unresolved,), {"__module__": module})


class _TolerantPickle:
    """A ``pickle_module`` for ``torch.load`` that survives classes Megatron-LM has removed."""

    Unpickler = _TolerantUnpickler
    load = staticmethod(lambda f, **kw: _TolerantUnpickler(f, **kw).load())
    __name__ = "megatron.checkpoint.reader._TolerantPickle"


def _is_zip_format(path: str) -> bool:
    return zipfile.is_zipfile(path)


def load_state_file(path: str, mmap_tensors: bool = True, name: Optional[str] = None) -> dict:
    """``torch.load`` of a checkpoint file on CPU, memory-mapped when its format allows.

    Args:
        path: the file.
        mmap_tensors: memory-map it when it is in PyTorch's zip format.
        name: how messages call the file (default ``path``).

    Raises:
        CheckpointError: naming the file when it is missing, unreadable or not a checkpoint.
    """
    name = name or path
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {name} does not exist")
    use_mmap = mmap_tensors and _is_zip_format(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=use_mmap,
                           pickle_module=_TolerantPickle)
    except Exception as error:  # truncated or foreign files raise many kinds of errors
        raise CheckpointError(f"cannot read checkpoint file {name}: "
                              f"{type(error).__name__}: {error}") from error
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{name} is not a Megatron checkpoint (no 'model' entry)")
    return state


def _mapped_ranges(path: str) -> List[Tuple[int, int]]:
    """Address ranges where ``path`` is mapped into this process (Linux), else ``[]``."""
    real = os.path.realpath(path)
    ranges = []
    with contextlib.suppress(OSError):
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].strip() == real:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((lo, hi))
    return ranges


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


class CheckpointSource:
    """The files of one checkpoint iteration, opened for reading.

    Args:
        path: a save directory or a ``.zip`` of one.
        iteration: the iteration to read (default: the tracker's; ``"release"`` for the
            release directory).
        num_attention_heads: for checkpoints without args (default 16, as NVIDIA's BERT-345M);
            given and saved values must agree.
        mmap_tensors: memory-map the files (default) instead of reading them whole.

    Raises:
        CheckpointError: naming the path when no checkpoint is found, ranks are missing, or the
            files disagree on the version or iteration.
    """

    def __init__(self, path: str, iteration=None, num_attention_heads: Optional[int] = None,
                 mmap_tensors: bool = True) -> None:
        self.path = path
        self._tempdir: Optional[str] = None
        self._prefix = ""
        self._states: Dict[int, dict] = {}
        self._models: Dict[int, Dict[str, torch.Tensor]] = {}
        self._ranges: List[Tuple[int, int]] = []
        self._libc = _libc() if mmap_tensors else None
        self.mmap_tensors = mmap_tensors
        self.num_attention_heads = num_attention_heads
        try:
            self._open(iteration, num_attention_heads)
        except BaseException:
            self.close()  # delete what a zip left in the temporary directory
            raise

    def _open(self, iteration, num_attention_heads: Optional[int]) -> None:
        root = self._unpack(self.path) if os.path.isfile(self.path) else self.path
        self.root = root
        self.iteration, self.release, self.directory = self._locate(root, iteration)
        ranks = sorted(int(m.group(1)) for m in
                       (re.fullmatch(r"mp_rank_(\d{2})", name) for name in
                        os.listdir(self.directory)) if m)
        if not ranks:
            raise CheckpointError(f"{self.directory} holds no mp_rank_XX directories")
        if ranks != list(range(len(ranks))):
            raise CheckpointError(f"{self.directory}: tensor-parallel ranks {ranks} are not "
                                  f"0..{len(ranks) - 1}; a rank is missing")
        self.tp = len(ranks)
        first = self.state(0)
        self.args = first.get("args")
        saved_tp = getattr(self.args, "tensor_model_parallel_size", None)
        if saved_tp is not None and saved_tp != self.tp:
            raise CheckpointError(f"{self.directory} holds {self.tp} mp_rank_XX directories, but "
                                  f"{self.file(0)} was saved at tensor-parallel size {saved_tp}: "
                                  "a rank is missing")
        try:
            self.version = legacy.check_version(first.get("checkpoint_version", 0),
                                                self.file(0))
        except ValueError as error:
            raise CheckpointError(str(error)) from error
        self.num_attention_heads = self._heads(num_attention_heads)

    def _heads(self, given: Optional[int]) -> int:
        saved = getattr(self.args, "num_attention_heads", None)
        if given is not None and saved is not None and given != saved:
            raise CheckpointError(f"{self.file(0)} was saved with {saved} attention heads, not "
                                  f"{given} (--num-attention-heads)")
        if given is None and saved is None:
            logger.warning("%s has no args: assuming %d attention heads (BERT-345M); pass "
                           "--num-attention-heads otherwise", self.file(0),
                           legacy.DEFAULT_NUM_ATTENTION_HEADS)
            return legacy.DEFAULT_NUM_ATTENTION_HEADS
        return given or saved

    # ------------------------------------------------------------------------ locating files

    def _unpack(self, path: str) -> str:
        """Extract the checkpoint files of a zip into a temporary directory; return its root."""
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path} is neither a checkpoint directory nor a zip file")
        with zipfile.ZipFile(path) as archive:
            members = {}
            for name in archive.namelist():
                match = _MEMBER.match(name)
                if match:
                    members.setdefault(match.group("root"), []).append(name)
            if len(members) != 1:
                found = "none" if not members else ", ".join(sorted(members))
                raise CheckpointError(
                    f"{path}: expected one checkpoint (release/mp_rank_00/model_optim_rng.pt "
                    f"or iter_XXXXXXX/mp_rank_XX/...) in the zip, found {found}")
            (prefix, names), = members.items()
            self._prefix = prefix
            tracker = prefix + TRACKER_FILENAME
            if tracker in archive.namelist():
                names.append(tracker)
            self._tempdir = tempfile.mkdtemp(prefix="megatron-ckpt-")
            for name in names:
                target = os.path.join(self._tempdir, name[len(prefix):])
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with archive.open(name) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 16 << 20)
        logger.info("extracted %s into %s", path, self._tempdir)
        return self._tempdir

    def _locate(self, root: str, iteration) -> Tuple[int, bool, str]:
        if not os.path.isdir(root):
            raise CheckpointError(f"checkpoint directory {root} does not exist")
        if iteration is not None:
            release = str(iteration) == "release"
            try:
                number = 0 if release else int(iteration)
            except ValueError:
                raise CheckpointError(f"iteration {iteration!r} is neither a number nor "
                                      "'release'") from None
            directory = os.path.dirname(os.path.dirname(
                get_checkpoint_name(root, number, release)))
            if not os.path.isdir(directory):
                raise CheckpointError(f"{self.path} has no checkpoint for iteration "
                                      f"{iteration} ({directory} does not exist)")
            return number, release, directory
        found = find_checkpoint(root)
        if found is not None:
            return found
        candidates = sorted(name for name in os.listdir(root)
                            if name == "release" or re.fullmatch(r"iter_\d{7}", name))
        if len(candidates) == 1:  # a zip without a tracker
            release = candidates[0] == "release"
            number = 0 if release else int(candidates[0][len("iter_"):])
            return number, release, os.path.join(root, candidates[0])
        raise CheckpointError(f"{self.path}: no {TRACKER_FILENAME} and no single iteration "
                              "directory (pass the iteration to read)")

    def _path(self, rank: int) -> str:
        return os.path.join(self.directory, f"mp_rank_{rank:02d}", "model_optim_rng.pt")

    def file(self, rank: int) -> str:
        """Rank ``rank``'s file as messages name it (``archive.zip:member`` inside a zip)."""
        path = self._path(rank)
        if self._tempdir is None:
            return path
        return f"{self.path}:{self._prefix}{os.path.relpath(path, self._tempdir)}"

    # ------------------------------------------------------------------------------ reading

    def state(self, rank: int) -> dict:
        """Rank ``rank``'s whole saved dict (tensors memory-mapped where possible)."""
        if rank not in self._states:
            path = self._path(rank)
            # Truncation shows in the size the training loop recorded (checkpoints without a
            # record, e.g. NVIDIA's, are read as they are).
            verify_checkpoint_file(self.directory, f"mp_rank_{rank:02d}/model_optim_rng.pt",
                                   check_hash=False)
            self._states[rank] = load_state_file(path, self.mmap_tensors, self.file(rank))
            if self._libc is not None:
                self._ranges.extend(_mapped_ranges(path))
        return self._states[rank]

    def model(self, rank: int) -> Dict[str, torch.Tensor]:
        """Rank ``rank``'s model as our flat state dict of the current checkpoint version."""
        if rank in self._models:
            return self._models[rank]
        state = self.state(rank)
        heads = None
        if self.num_attention_heads is not None:
            heads = self.num_attention_heads // self.tp
        try:
            model = legacy.normalize_model_state_dict(state["model"], self.version, heads,
                                                      self.file(rank))
        except ValueError as error:
            raise CheckpointError(str(error)) from error
        self._models[rank] = model
        return model

    def release_pages(self, *tensors: torch.Tensor) -> None:
        """Drop the pages of these memory-mapped source tensors from this process (Linux).

        Only addresses inside this checkpoint's read-only file mappings are touched; anything
        else (copies, tensors of non-mapped files) is left alone. A later read of a released
        tensor reads the file again.
        """
        if self._libc is None or not self._ranges:
            return
        page = mmap.PAGESIZE
        for tensor in tensors:
            storage = tensor.untyped_storage()
            lo, hi = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
            lo, hi = -(-lo // page) * page, hi // page * page
            for start, stop in self._ranges:
                a, b = max(lo, start), min(hi, stop)
                if b > a:
                    self._libc.madvise(a, b - a, _MADV_DONTNEED)

    def close(self) -> None:
        """Forget the loaded states and delete the files extracted from a zip."""
        self._states.clear()
        self._models.clear()
        self._ranges = []
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    def __enter__(self) -> "CheckpointSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

