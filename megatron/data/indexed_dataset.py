"""Megatron-LM's memory-mapped indexed dataset (``--dataset-impl mmap``), byte-compatible.

A dataset ``PREFIX`` is two files. ``PREFIX.bin`` holds every sequence's token ids back to back
in one dtype, nothing else. ``PREFIX.idx`` is the index, all little-endian:

====================  ============  ====================================================
field                 type          meaning
====================  ============  ====================================================
magic                 9 bytes       ``b"MMIDIDX\\x00\\x00"``
version               ``<Q``        ``1``
dtype code            ``<B``        see :data:`DTYPES` (4 = int32, 8 = uint16, ...)
number of sequences   ``<Q``        ``N``
number of doc_idx     ``<Q``        ``D`` = number of documents + 1
sizes                 int32[N]      tokens in each sequence (a sentence or a document)
pointers              int64[N]      byte offset of each sequence in ``PREFIX.bin``
doc_idx               int64[D]      ``doc_idx[d]`` is the first sequence of document ``d``;
                                    starts with 0 and ends with ``N``
====================  ============  ====================================================

Files written by Megatron-LM's ``tools/preprocess_data.py`` read here and the other way round.
The reader maps both files (``np.memmap``), so its memory does not grow with the file. The builder
writes to temporary names in the destination directory and renames them into place in
:meth:`MMapIndexedDatasetBuilder.finalize`, so an interrupted run leaves no half-written dataset.
"""

import logging
import os
import shutil
import struct
import uuid
from array import array
from typing import Optional, Union

import numpy as np
import torch

__all__ = ["DTYPES", "MMapIndexedDataset", "MMapIndexedDatasetBuilder", "best_fitting_dtype",
           "code", "data_file_path", "index_file_path", "dataset_exists", "infer_dataset_impl",
           "make_builder", "make_dataset", "temporary_path"]

logger = logging.getLogger(__name__)

_HDR_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, doc_idx entries

# Megatron-LM's dtype table. Code 6 was ``np.float`` (an alias of float64) in old Megatron.
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
          7: np.float64, 8: np.uint16}


def code(dtype) -> int:
    """Megatron's dtype code of ``dtype`` (the first matching entry of :data:`DTYPES`).

    Raises:
        ValueError: for a dtype the format cannot store.
    """
    dtype = np.dtype(dtype)
    for key, value in DTYPES.items():
        if np.dtype(value) == dtype:
            return key
    raise ValueError(f"dtype {dtype} cannot be stored in an indexed dataset "
                     f"(supported: {sorted({np.dtype(v).name for v in DTYPES.values()})})")


def best_fitting_dtype(vocab_size: Optional[int] = None) -> type:
    """uint16 for vocabularies below 65,500 ids, int32 otherwise (Megatron's rule)."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def index_file_path(prefix_path: str) -> str:
    return prefix_path + ".idx"


def data_file_path(prefix_path: str) -> str:
    return prefix_path + ".bin"


def dataset_exists(prefix_path: str) -> bool:
    """Both ``PREFIX.idx`` and ``PREFIX.bin`` exist."""
    return os.path.exists(index_file_path(prefix_path)) and os.path.exists(
        data_file_path(prefix_path))


def temporary_path(path: str) -> str:
    """A unique temporary name next to ``path`` (same directory, so a rename is atomic)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def infer_dataset_impl(path: str) -> Optional[str]:
    """``"mmap"`` when ``path.idx`` starts with the mmap magic, ``None`` otherwise."""
    if not os.path.exists(index_file_path(path)):
        return None
    with open(index_file_path(path), "rb") as handle:
        return "mmap" if handle.read(len(_HDR_MAGIC)) == _HDR_MAGIC else None


def _check_impl(impl: str) -> None:
    if impl != "mmap":
        raise ValueError(f"--dataset-impl {impl!r} is not supported; only 'mmap' "
                         "(Megatron-LM's default format) is")


def make_builder(out_file: str, impl: str = "mmap",
                 vocab_size: Optional[int] = None) -> "MMapIndexedDatasetBuilder":
    """A builder writing ``out_file`` (the ``.bin``) with the best dtype for ``vocab_size``."""
    _check_impl(impl)
    return MMapIndexedDatasetBuilder(out_file, dtype=best_fitting_dtype(vocab_size))


def make_dataset(path: str, impl: str = "mmap", skip_warmup: bool = False) -> "MMapIndexedDataset":
    """Open the dataset ``path`` (a prefix); ``impl`` may be ``"infer"``.

    Raises:
        FileNotFoundError: if ``path.idx`` or ``path.bin`` is missing.
        ValueError: for an unsupported implementation or a malformed index.
    """
    if not dataset_exists(path):
        raise FileNotFoundError(f"dataset {path!r} not found: need {index_file_path(path)} "
                                f"and {data_file_path(path)}")
    if impl == "infer":
        impl = infer_dataset_impl(path) or "unknown (not an mmap index)"
    _check_impl(impl)
    return MMapIndexedDataset(path, skip_warmup=skip_warmup)


def _map(path: str) -> Union[np.memmap, np.ndarray]:
    if os.path.getsize(path) == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, mode="r", order="C")


class _Index:
    """The parsed ``.idx`` file; ``sizes``, ``pointers`` and ``doc_idx`` are views of the map."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._buffer = _map(path)
        if len(self._buffer) < _HEADER.size:
            raise ValueError(f"{path}: too short ({len(self._buffer)} bytes) for an index header")
        magic, version, dtype_code, length, doc_count = _HEADER.unpack_from(self._buffer, 0)
        if magic != _HDR_MAGIC:
            raise ValueError(f"{path}: not a Megatron mmap index (magic {magic!r}, expected "
                             f"{_HDR_MAGIC!r})")
        if version != _VERSION:
            raise ValueError(f"{path}: index version {version}, only {_VERSION} is supported")
        if dtype_code not in DTYPES:
            raise ValueError(f"{path}: unknown dtype code {dtype_code}")
        self.dtype = np.dtype(DTYPES[dtype_code])
        expected = _HEADER.size + length * (4 + 8) + doc_count * 8
        if len(self._buffer) != expected:
            raise ValueError(f"{path}: {len(self._buffer)} bytes, expected {expected} for "
                             f"{length} sequences and {doc_count} doc_idx entries (truncated?)")
        offset = _HEADER.size
        self.sizes = np.frombuffer(self._buffer, np.int32, length, offset)
        offset += self.sizes.nbytes
        self.pointers = np.frombuffer(self._buffer, np.int64, length, offset)
        offset += self.pointers.nbytes
        self.doc_idx = np.frombuffer(self._buffer, np.int64, doc_count, offset)

    def __len__(self) -> int:
        return len(self.sizes)

    def data_bytes(self) -> int:
        """Bytes of ``.bin`` the index refers to."""
        if len(self.sizes) == 0:
            return 0
        return int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize


class MMapIndexedDataset(torch.utils.data.Dataset):
    """Read-only, memory-mapped view of ``PREFIX.bin``/``PREFIX.idx``.

    ``dataset[i]`` is sequence ``i`` as a read-only numpy array (a view of the map); a slice with
    step 1 gives a list of arrays; :meth:`get` reads part of a sequence. ``sizes`` and ``doc_idx``
    are the index arrays. Pickles as its path, so DataLoader workers reopen the files.

    Args:
        path: the dataset prefix.
        skip_warmup: do not read the files once to warm the page cache.
    """

    def __init__(self, path: str, skip_warmup: bool = False) -> None:
        super().__init__()
        self._do_init(path, skip_warmup)

    def _do_init(self, path: str, skip_warmup: bool) -> None:
        self._path = path
        self._index = _Index(index_file_path(path))
        self._bin_buffer = _map(data_file_path(path))
        needed = self._index.data_bytes()
        if len(self._bin_buffer) < needed:
            raise ValueError(f"{data_file_path(path)}: {len(self._bin_buffer)} bytes, but the "
                             f"index refers to {needed} (truncated or mismatched .bin/.idx)")
        self._doc_idx = self._index.doc_idx
        if not skip_warmup:
            self._warmup()

    def _warmup(self, chunk: int = 1 << 26) -> None:
        for buffer in (self._index._buffer, self._bin_buffer):
            for start in range(0, len(buffer), chunk):
                int(np.asarray(buffer[start:start + chunk]).sum(dtype=np.uint64) & 1)

    def __getstate__(self):
        return self._path

    def __setstate__(self, state) -> None:
        self._do_init(state, skip_warmup=True)

    def __len__(self) -> int:
        return len(self._index)

    def _read(self, pointer: int, count: int) -> np.ndarray:
        return np.frombuffer(self._bin_buffer, dtype=self._index.dtype, count=count,
                             offset=pointer)

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            length = len(self)
            if idx < 0:
                idx += length
            if not 0 <= idx < length:
                raise IndexError(f"index {idx} out of range for {length} sequences")
            return self._read(int(self._index.pointers[idx]), int(self._index.sizes[idx]))
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices must be contiguous (step 1)")
            if stop <= start:
                return []
            sizes = self._index.sizes[start:stop]
            flat = self._read(int(self._index.pointers[start]), int(sizes.sum()))
            return np.split(flat, np.cumsum(sizes)[:-1])
        raise TypeError(f"indices must be integers or slices, not {type(idx).__name__}")

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``idx`` (to its end by default).

        Raises:
            IndexError: if the range is not inside the sequence.
        """
        size = int(self._index.sizes[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"offset {offset} + length {length} outside sequence {idx} "
                             f"of {size} tokens")
        pointer = int(self._index.pointers[idx]) + offset * self._index.dtype.itemsize
        return self._read(pointer, length)

    @property
    def sizes(self) -> np.ndarray:
        return self._index.sizes

    @property
    def pointers(self) -> np.ndarray:
        return self._index.pointers

    @property
    def doc_idx(self) -> np.ndarray:
        return self._doc_idx

    def get_doc_idx(self) -> np.ndarray:
        return self._doc_idx

    def set_doc_idx(self, doc_idx: np.ndarray) -> None:
        self._doc_idx = doc_idx

    @property
    def dtype(self) -> np.dtype:
        return self._index.dtype

    @property
    def supports_prefetch(self) -> bool:
        return False

    @staticmethod
    def exists(path: str) -> bool:
        return dataset_exists(path)


class MMapIndexedDatasetBuilder:
    """Writes a dataset: ``add_item`` per sequence, ``end_document`` after each document.

    The ``.bin`` goes to a temporary file next to ``out_file``; :meth:`finalize` writes the index
    the same way and renames both into place. :meth:`abort` (or leaving a ``with`` block on an
    exception) removes the temporaries.

    Args:
        out_file: final path of the ``.bin`` file.
        dtype: dtype of the stored ids (see :func:`best_fitting_dtype`).
    """

    def __init__(self, out_file: str, dtype=np.int64) -> None:
        self._out_file = out_file
        self._dtype = np.dtype(dtype)
        code(self._dtype)
        self._tmp_data = temporary_path(out_file)
        self._tmp_index: Optional[str] = None
        self._data_file = open(self._tmp_data, "wb")
        self._sizes = array("i")
        self._doc_idx = array("q", [0])
        if self._dtype.kind in "iu":
            info = np.iinfo(self._dtype)
            self._range = (int(info.min), int(info.max))
        else:
            self._range = None

    def __enter__(self) -> "MMapIndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()

    def _as_array(self, tensor) -> np.ndarray:
        if torch.is_tensor(tensor):
            tensor = tensor.detach().cpu().numpy()
        values = np.asarray(tensor).reshape(-1)
        if self._range is not None and values.size and values.dtype.kind in "iu":
            low, high = int(values.min()), int(values.max())
            if low < self._range[0] or high > self._range[1]:
                raise ValueError(f"token id range [{low}, {high}] does not fit dtype "
                                 f"{self._dtype.name} of {self._out_file}")
        return values.astype(self._dtype, copy=False)

    def add_item(self, tensor) -> None:
        """Append one sequence (a tensor, array or list of ids)."""
        values = self._as_array(tensor)
        self._data_file.write(values.tobytes(order="C"))
        self._sizes.append(values.size)

    def add_doc(self, tensor, lengths) -> None:
        """Append a whole document: the ids of all its sequences and their lengths."""
        values = self._as_array(tensor)
        lengths = [int(n) for n in lengths]
        if sum(lengths) != values.size:
            raise ValueError(f"lengths sum to {sum(lengths)} but the document has "
                             f"{values.size} ids")
        self._data_file.write(values.tobytes(order="C"))
        self._sizes.extend(lengths)
        self.end_document()

    def end_document(self) -> None:
        """Close the current document (its sequences are those added since the last call)."""
        self._doc_idx.append(len(self._sizes))

    def merge_file_(self, another_file: str) -> None:
        """Append every document of the dataset ``another_file`` (a prefix, same dtype).

        Raises:
            ValueError: if its dtype differs from this builder's.
        """
        index = _Index(index_file_path(another_file))
        if index.dtype != self._dtype:
            raise ValueError(f"cannot merge {another_file} ({index.dtype.name}) into a "
                             f"{self._dtype.name} dataset")
        offset = len(self._sizes)
        self._sizes.extend(index.sizes.tolist())
        self._doc_idx.extend((offset + index.doc_idx[1:]).tolist())
        with open(data_file_path(another_file), "rb") as source:
            shutil.copyfileobj(source, self._data_file, length=1 << 22)

    def _write_index(self, path: str) -> None:
        sizes = np.frombuffer(self._sizes, dtype=np.int32) if len(self._sizes) else \
            np.zeros(0, np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self._dtype.itemsize
        doc_idx = np.frombuffer(self._doc_idx, dtype=np.int64)
        with open(path, "wb") as handle:
            handle.write(_HEADER.pack(_HDR_MAGIC, _VERSION, code(self._dtype), len(sizes),
                                      len(doc_idx)))
            handle.write(sizes.astype("<i4").tobytes(order="C"))
            handle.write(pointers.astype("<i8").tobytes(order="C"))
            handle.write(doc_idx.astype("<i8").tobytes(order="C"))

    def finalize(self, index_file: str) -> None:
        """Write the index and move ``.bin`` and ``.idx`` to their final names."""
        try:
            self._data_file.close()
            self._tmp_index = temporary_path(index_file)
            self._write_index(self._tmp_index)
            os.replace(self._tmp_data, self._out_file)
            os.replace(self._tmp_index, index_file)
        except BaseException:
            self.abort()
            raise
        logger.info("wrote %s (%d sequences, %d documents)", index_file, len(self._sizes),
                    len(self._doc_idx) - 1)

    def abort(self) -> None:
        """Close and delete the temporary files; nothing is left at the final names."""
        self._data_file.close()
        for path in (self._tmp_data, self._tmp_index):
            if path and os.path.exists(path):
                os.remove(path)

    @property
    def num_sequences(self) -> int:
        return len(self._sizes)

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1

