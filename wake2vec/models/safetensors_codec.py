"""The safetensors file format, read and written by a small codec of our own.

Not the `safetensors` package: this one gives bf16/fp16 through ml_dtypes without torch, and
reads a single tensor into its own buffer without mapping the whole file (so loading a model
costs the converted weights plus the largest tensor, wake2vec.models.convert).
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Any, Iterator

import ml_dtypes
import numpy as np

from wake2vec.errors import UserError


class CheckpointFormatError(UserError, ValueError):
    """A checkpoint directory or weight file is missing, malformed or disagrees with its config."""


_ST_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def read_header(path: pathlib.Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{path}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + header_len


def iter_tensors(path: pathlib.Path, names: frozenset[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) one tensor at a time, each read into its own buffer; with
    `names`, only those tensors are read (the others' bytes are never touched)."""
    header, data_start = read_header(path)
    with open(path, "rb") as f:
        for name, info in header.items():
            if names is not None and name not in names:
                continue
            if info["dtype"] not in _ST_DTYPES:
                raise CheckpointFormatError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            dtype = _ST_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            f.seek(data_start + begin)
            buf = f.read(end - begin)
            if len(buf) != end - begin:
                raise CheckpointFormatError(f"{path}: tensor {name} is truncated (file too short)")
            yield name, np.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def write_safetensors(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    """Writes tensors in the safetensors layout, streaming each to disk in turn."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, arr in tensors.items():
        if arr.dtype not in _ST_NAMES:
            raise ValueError(f"cannot store tensor {name} of dtype {arr.dtype} in safetensors")
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)
