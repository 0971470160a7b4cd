"""Safetensors files without torch: a validated reader (tensor by tensor) and a writer.

numpy has no bfloat16, so the safetensors package's numpy API cannot read bf16 checkpoints; this
reader reads each tensor on demand (bf16 via ml_dtypes), and validates the header
and every byte range first, so truncated or corrupt files fail with the file named.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from ..errors import ChameleonError
from .killpoint import point

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def _int(v, name: str, field: str) -> int:
    """A header integer (JSON ints only: no bools, floats or strings)."""
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"tensor {name!r}: {field} holds {v!r}, expected integers")
    return v


class SafetensorsFile:
    """Read-only safetensors file; each tensor is read on demand into numpy (any dtype, bf16 too).

    Validates the header and that every tensor's byte range lies inside the file, so truncated
    or corrupt files fail here with the file named, not later with a bus error.
    """

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise ChameleonError(f"{path}: file not found")
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100 * 2**20:
                    raise ValueError(f"header length {n} exceeds the file size {size}")
                header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            self.metadata = header.pop("__metadata__", None) or {}
            if not isinstance(self.metadata, dict):
                raise ValueError(f"__metadata__ is a {type(self.metadata).__name__}, expected an object")
            data_size = size - 8 - n
            self._entries = {}
            for name, e in header.items():
                if not isinstance(e, dict):
                    raise ValueError(f"tensor {name!r}: expected an object with dtype, shape and data_offsets, "
                                     f"got {type(e).__name__}")
                dtype = _ST_DTYPES.get(e.get("dtype")) if isinstance(e.get("dtype"), str) else None
                if dtype is None:
                    raise ValueError(f"tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
                start, end = (_int(v, name, "data_offsets") for v in e["data_offsets"])
                shape = tuple(_int(s, name, "shape") for s in e["shape"])
                if not 0 <= start <= end <= data_size:
                    raise ValueError(f"tensor {name!r} lies outside the file (truncated?)")
                if min(shape, default=0) < 0:
                    raise ValueError(f"tensor {name!r}: negative dimension in shape {list(shape)}")
                if end - start != math.prod(shape) * np.dtype(dtype).itemsize:
                    raise ValueError(f"tensor {name!r}: byte size does not match shape {shape}")
                self._entries[name] = (np.dtype(dtype), shape, 8 + n + start)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as e:
            raise ChameleonError(f"{path}: not a valid safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        """A fresh array read from the file (not a view of a mapping: mapped pages would stay
        resident and count against the process, so converting a checkpoint would hold all of it)."""
        dtype, shape, offset = self._entries[name]
        out = np.empty(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(offset)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != out.nbytes:
            raise ChameleonError(f"{self.path}: tensor {name!r} is cut short (file truncated while reading?)")
        return out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Write tensors to ``path`` (numpy arrays, bf16 via ml_dtypes). Not atomic by itself."""
    header: dict[str, Any] = {}
    offset = 0
    arrays = {}
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]))
        if a.dtype not in _ST_NAMES:
            raise ChameleonError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors")
        header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays[name] = a
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        point(f"safetensors header: {path}")
        for name in sorted(arrays):
            f.write(arrays[name].tobytes())
            point(f"safetensors tensor {name}: {path}")
