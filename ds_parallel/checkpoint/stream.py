"""Safetensors files written tensor by tensor (our checkpoints and Hugging Face exports).

safetensors' own `save_file` serialises the whole dict into one buffer before writing, so
exporting a model would hold a second copy of it. Here the header is planned from shapes and
dtypes alone, then each tensor is produced by its `fetch` (a view, a gather, a cast) when its
turn comes, written, and dropped. The format: 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets}, "__metadata__": {...}} padded with spaces to 8
bytes, then the raw little-endian data in header order.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ds_parallel.atomic import atomic_open

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


@dataclass
class TensorItem:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fetch: Callable[[], torch.Tensor]  # produces the tensor when its turn comes

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors(path: str, items: list[TensorItem], metadata: Optional[dict[str, str]] = None) -> None:
    """Write `items` in order; only the tensor being written is alive. Atomic and durable
    (ds_parallel/atomic.py)."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for it in items:
        header[it.name] = {
            "dtype": _ST_DTYPES[it.dtype], "shape": list(it.shape), "data_offsets": [offset, offset + it.nbytes],
        }
        offset += it.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header with spaces to 8-byte alignment
    with atomic_open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for it in items:
            t = it.fetch().detach().to("cpu", it.dtype).contiguous()
            if tuple(t.shape) != it.shape:
                raise RuntimeError(f"{it.name}: produced shape {tuple(t.shape)}, planned {it.shape}")
            fh.write(t.reshape(-1).view(torch.uint8).numpy().data)  # little-endian raw bytes, no copy


def split_by_size(items: list[TensorItem], max_bytes: int) -> list[list[TensorItem]]:
    """Consecutive groups of at most `max_bytes` (a larger tensor gets a group of its own)."""
    shards: list[list[TensorItem]] = [[]]
    size = 0
    for it in items:
        if shards[-1] and size + it.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it.nbytes
    return shards
