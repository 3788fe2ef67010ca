"""Write a ``.safetensors`` file tensor by tensor, without holding the model in memory.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length,
a JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
padded with spaces to a multiple of 8 bytes, then the raw little-endian bytes of every tensor.
The header is written first from the shapes alone; each tensor's bytes are then written at its
offset when it is ready. Names are laid out in sorted order, so the same tensors always give the
same file.
"""

import json
import os
from typing import BinaryIO, Dict, Optional, Sequence, Tuple

import torch

__all__ = ["SafetensorsWriter"]

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
           torch.int8: "I8", torch.bool: "BOOL"}


class SafetensorsWriter:
    """Open ``path`` for the tensors described by ``layout``; write each with :meth:`write`.

    Args:
        path: the file to create.
        layout: ``{name: (shape, dtype)}`` of every tensor the file will hold.
        metadata: string metadata (Hugging Face expects ``{"format": "pt"}``).

    Raises:
        ValueError: for a dtype the format has no name for.
    """

    def __init__(self, path: str, layout: Dict[str, Tuple[Sequence[int], torch.dtype]],
                 metadata: Optional[Dict[str, str]] = None) -> None:
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._spans: Dict[str, Tuple[int, int]] = {}
        for name in sorted(layout):
            shape, dtype = layout[name]
            if dtype not in _DTYPES:
                raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            self._spans[name] = (offset, size)
            offset += size
        self._layout = {name: (tuple(shape), dtype) for name, (shape, dtype) in layout.items()}
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        self._data_start = 8 + len(text)
        self._file: BinaryIO = open(path, "wb")
        self._file.write(len(text).to_bytes(8, "little"))
        self._file.write(text)
        self._file.truncate(self._data_start + offset)
        self._pending = set(layout)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (its shape and dtype must match the layout) at its place.

        Raises:
            KeyError: for a name not in the layout. ValueError: for a shape or dtype mismatch.
        """
        shape, dtype = self._layout[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, the header says "
                             f"{shape} {dtype}")
        start, size = self._spans[name]
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.seek(self._data_start + start)
        self._file.write(memoryview(data.numpy()))
        self._pending.discard(name)

    def close(self) -> None:
        """Finish the file.

        Raises:
            ValueError: naming a tensor of the layout that was never written.
        """
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self._pending:
            raise ValueError(f"tensor {sorted(self._pending)[0]} was never written")
