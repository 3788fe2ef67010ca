"""``torch.save``-compatible files written one tensor at a time.

``torch.save`` needs every tensor in memory while it writes. :func:`save_streaming` writes the
same format (a zip of ``data.pkl`` plus one ``data/<key>`` record per storage, records aligned to
64 bytes so ``torch.load(mmap=True)`` can map them) from an object whose large tensors are
:class:`LazyTensor` placeholders: the pickle is written first from their shapes and dtypes, then
each placeholder is computed, written and dropped in turn. Resharding to a large target rank
then holds one tensor, not the whole rank. ``torch.load`` reads the result like any checkpoint.

The format is PyTorch's (``torch/serialization.py``): ``data.pkl`` pickles each tensor as
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`` with
the storage as the persistent id ``("storage", torch.<Type>Storage, key, "cpu", numel)``, and the
archive holds ``.format_version``, ``.storage_alignment``, ``byteorder`` and ``version``. Every
tensor gets its own storage (views are not shared, as after ``.clone()``).
"""

import collections
import io
import os
import pickle
import struct
import sys
import uuid
import zipfile
from typing import Callable, List, Tuple, Union

import torch

__all__ = ["LazyTensor", "save_streaming"]

_ALIGNMENT = 64
_STORAGE_TYPES = {torch.float32: "FloatStorage", torch.float16: "HalfStorage",
                  torch.bfloat16: "BFloat16Storage", torch.float64: "DoubleStorage",
                  torch.int64: "LongStorage", torch.int32: "IntStorage",
                  torch.int16: "ShortStorage", torch.int8: "CharStorage",
                  torch.uint8: "ByteStorage", torch.bool: "BoolStorage"}
_PADDING_FIELD = 0x4246  # an extra-field id for alignment padding (PyTorch's writer uses it too)


class LazyTensor:
    """A contiguous CPU tensor of ``shape`` and ``dtype`` that ``compute()`` produces on demand.

    Args:
        shape: its shape.
        dtype: its dtype.
        compute: returns the tensor (called once, when it is written).
    """

    def __init__(self, shape, dtype: torch.dtype, compute: Callable[[], torch.Tensor]) -> None:
        self.shape, self.dtype, self.compute = tuple(shape), dtype, compute

    def materialize(self) -> torch.Tensor:
        """Compute the tensor and check its shape and dtype.

        Raises:
            ValueError: when the result differs from the announced shape or dtype.
        """
        tensor = self.compute()
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise ValueError(f"computed {tuple(tensor.shape)} {tensor.dtype}, announced "
                             f"{self.shape} {self.dtype}")
        return tensor

    def __repr__(self) -> str:
        return f"LazyTensor({self.shape}, {self.dtype})"


class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _Pickler(pickle.Pickler):
    """Pickles tensors and lazy tensors as PyTorch does, collecting what to write after."""

    def __init__(self, file, pending: List[Tuple[str, Union[torch.Tensor, LazyTensor]]]):
        super().__init__(file, protocol=2)
        self.pending = pending

    def reducer_override(self, obj):
        if not isinstance(obj, (torch.Tensor, LazyTensor)):
            return NotImplemented
        if isinstance(obj, torch.Tensor) and (obj.device.type != "cpu" or obj.is_sparse):
            raise ValueError(f"only dense CPU tensors can be streamed, got {obj.device} "
                             f"{obj.layout}")
        if obj.dtype not in _STORAGE_TYPES:
            raise ValueError(f"dtype {obj.dtype} is not supported")
        key = str(len(self.pending))
        self.pending.append((key, obj))
        shape = tuple(obj.shape)
        stride, numel = [], 1
        for size in reversed(shape):  # contiguous strides
            stride.insert(0, numel)
            numel *= size
        storage = _StorageRef(key, obj.dtype, numel)
        return (torch._utils._rebuild_tensor_v2,
                (storage, 0, shape, tuple(stride), False, collections.OrderedDict()))

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            storage_type = getattr(torch, _STORAGE_TYPES[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None


def _padding(archive: zipfile.ZipFile, name: str, size: int) -> bytes:
    """An extra field that puts the record's data at a multiple of 64 bytes."""
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # as zipfile decides for a known size
    start = archive.fp.tell() + 30 + len(name.encode("ascii")) + (20 if zip64 else 0) + 4
    pad = -start % _ALIGNMENT
    return struct.pack("<HH", _PADDING_FIELD, pad) + b"\0" * pad


def _write_record(archive: zipfile.ZipFile, name: str, data) -> None:
    view = memoryview(data).cast("B")
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = view.nbytes
    info.extra = _padding(archive, name, view.nbytes)
    with archive.open(info, mode="w") as handle:
        step = 256 << 20
        for start in range(0, view.nbytes, step):
            handle.write(view[start:start + step])


def _tensor_bytes(tensor: torch.Tensor):
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def save_streaming(obj, handle, archive_name: str = "archive") -> None:
    """Write ``obj`` as ``torch.save`` would, computing :class:`LazyTensor` s one at a time.

    Args:
        obj: the object (dicts, lists, tuples, argparse namespaces, tensors, lazy tensors...).
        handle: a writable, seekable binary file.
        archive_name: the folder name inside the zip.

    Raises:
        ValueError: for a tensor that cannot be written (device, layout, dtype) or a lazy
            tensor that computes something else than it announced.
    """
    if sys.byteorder != "little":
        raise ValueError("streaming saves are written little-endian only")
    pending: List[Tuple[str, Union[torch.Tensor, LazyTensor]]] = []
    pickle_buffer = io.BytesIO()
    _Pickler(pickle_buffer, pending).dump(obj)
    prefix = archive_name + "/"
    with zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_STORED,
                         allowZip64=True) as archive:
        _write_record(archive, prefix + "data.pkl", pickle_buffer.getvalue())
        _write_record(archive, prefix + ".format_version", b"1")
        _write_record(archive, prefix + ".storage_alignment", str(_ALIGNMENT).encode())
        _write_record(archive, prefix + "byteorder", b"little")
        for index, (key, tensor) in enumerate(pending):
            pending[index] = (key, None)  # drop our reference once written
            if isinstance(tensor, LazyTensor):
                tensor = tensor.materialize()
            _write_record(archive, f"{prefix}data/{key}", _tensor_bytes(tensor))
            del tensor
        _write_record(archive, prefix + "version", b"3\n")
        _write_record(archive, prefix + ".data/serialization_id",
                      str(uuid.uuid4().int).zfill(40)[:40].encode())
    handle.flush()
    os.fsync(handle.fileno())
