"""Writing a ``.safetensors`` file tensor by tensor, so a converted model never has to sit in memory twice.

``safetensors.torch.save_file`` serialises the whole state dict into one buffer first (a second copy of the model).
The format is simple (an 8-byte little-endian header length, a JSON header giving every tensor's dtype, shape and
byte range, then the bytes), so the header is written from the tensors' specs up front and each tensor's bytes go
to their place as soon as the tensor is merged.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

__all__ = ["SafetensorsStreamWriter"]

_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}


class SafetensorsStreamWriter:
    """``with SafetensorsStreamWriter(path, {name: (dtype, shape)}) as w: w.write(name, tensor)`` in any order; every
    tensor must be written exactly once."""

    def __init__(self, path: str | os.PathLike, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = dict(specs)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._offsets = {}
        for name, (dtype, shape) in self.specs.items():
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._offsets[name] = (offset, size)
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._base = 8 + len(encoded)
        self._total = offset
        self._written: set[str] = set()
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._file.truncate(self._base + self._total)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self.specs[name]
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, the header says {tuple(shape)}")
        if name in self._written:
            raise ValueError(f"{name} written twice")
        data = tensor.detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy()
        offset, size = self._offsets[name]
        assert data.nbytes == size
        self._file.seek(self._base + offset)
        self._file.write(data.tobytes() if not data.flags.c_contiguous else memoryview(data))
        self._written.add(name)

    def close(self) -> None:
        self._file.close()
        missing = set(self.specs) - self._written
        if missing:
            raise ValueError(f"{len(missing)} tensors were never written (e.g. {sorted(missing)[0]})")

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.close()
        else:
            self._file.close()
