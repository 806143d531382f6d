"""The safetensors block format, parsed by hand so tensors can be views into one read buffer.

``safetensors.torch.load`` copies every tensor out of the bytes it is given; on the load path
that copy costs as much as the read. Here a file's data region lands in one buffer and each
tensor is a view into it. The file is untrusted until its digest is checked, so the header is
validated strictly first: known dtypes, non-negative shapes, offsets that tile the data
region exactly (the rule safetensors itself enforces), sizes that match dtype x shape.
JSON only: no pickle, no eval.

Layout (https://github.com/huggingface/safetensors): 8-byte little-endian header length N,
N bytes of UTF-8 JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data region; offsets are relative to its start.
"""
from __future__ import annotations

import functools
import json
import math
import struct
import sys
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch

from .errors import EdgesplitError

R = TypeVar("R")

PREFIX_BYTES = 8  # the u64 header length
MAX_HEADER_BYTES = 4 * 1024 * 1024  # parsing costs ~11x the header in memory; ours are a few KiB
MAX_DIMS = 64  # more than any real tensor; bounds the work a hostile header can ask for
METADATA_KEY = "__metadata__"

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in [("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
                       ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
                       ("BOOL", "bool"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                       ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("C64", "complex64")]
    if hasattr(torch, attr)  # the unsigned and float8 types need a recent torch
}


class BlockFormatError(EdgesplitError, ValueError):
    """A block file is not a well-formed safetensors file (corrupt, truncated or hostile)."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor's entry in the header; ``begin``/``end`` are byte offsets into the data region."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class BlockLayout:
    """A validated header: where the data region starts and which tensors tile it."""

    data_start: int  # file offset of the data region
    data_bytes: int
    tensors: tuple[TensorSpec, ...]
    metadata: dict[str, str]


def header_length(prefix: bytes | memoryview, file_bytes: int) -> int:
    """The JSON header's length from the file's first 8 bytes, checked against the file size."""
    if len(prefix) < PREFIX_BYTES or file_bytes < PREFIX_BYTES:
        raise BlockFormatError(f"file of {file_bytes} bytes is shorter than the {PREFIX_BYTES}-byte header length")
    (n,) = struct.unpack("<Q", prefix[:PREFIX_BYTES])
    if n > MAX_HEADER_BYTES:
        raise BlockFormatError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap")
    if PREFIX_BYTES + n > file_bytes:
        raise BlockFormatError(f"header length {n} runs past the end of a {file_bytes}-byte file")
    return n


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise BlockFormatError(f"header names {k!r} twice")
        out[k] = v
    return out


def _int(v: Any, what: str) -> int:
    if type(v) is not int or v < 0:  # bool is an int subclass: refuse it too
        raise BlockFormatError(f"{what} must be a non-negative integer, got {v!r}")
    return v


def _spec(name: str, entry: Any, data_bytes: int) -> TensorSpec:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise BlockFormatError(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets; got {entry!r}")
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise BlockFormatError(f"tensor {name!r}: unknown dtype {entry['dtype']!r}; known: {sorted(DTYPES)}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise BlockFormatError(f"tensor {name!r}: shape must be a list of at most {MAX_DIMS} sizes, got {shape!r}")
    dims = tuple(_int(d, f"tensor {name!r} shape entry") for d in shape)
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise BlockFormatError(f"tensor {name!r}: data_offsets must be [begin, end], got {offsets!r}")
    begin, end = (_int(o, f"tensor {name!r} offset") for o in offsets)
    if not begin <= end <= data_bytes:
        raise BlockFormatError(f"tensor {name!r}: offsets [{begin}, {end}] are out of range for a "
                               f"{data_bytes}-byte data region")
    # math.prod of Python ints cannot overflow, and end - begin <= data_bytes bounds what passes
    want = math.prod(dims) * dtype.itemsize
    if want != end - begin:
        raise BlockFormatError(f"tensor {name!r}: {entry['dtype']} x {list(dims)} needs {want} bytes, "
                               f"offsets give {end - begin}")
    return TensorSpec(name, dtype, dims, begin, end)


def _refusing(fn: Callable[..., R]) -> Callable[..., R]:
    """Whatever an untrusted header makes the parser or torch raise becomes one BlockFormatError."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> R:
        try:
            return fn(*args, **kwargs)
        except BlockFormatError:
            raise
        except torch.OutOfMemoryError:
            raise  # a device that is full, not a malformed file
        except (ValueError, TypeError, OverflowError, RecursionError, RuntimeError, UnicodeError, KeyError) as e:
            raise BlockFormatError(f"malformed block file ({type(e).__name__}: {str(e)[:200]})") from None

    return wrapped


@_refusing
def parse_header(header: bytes, file_bytes: int) -> BlockLayout:
    """Validate a block file's JSON header against the file's size.

    Args:
        header: the N header bytes (after the 8-byte length).
        file_bytes: the whole file's size.
    Returns:
        The layout; its tensors are sorted by offset and tile the data region exactly.
    Raises:
        BlockFormatError: anything malformed, out of range, overlapping or of the wrong size.
    """
    data_start = PREFIX_BYTES + len(header)
    data_bytes = file_bytes - data_start
    if data_bytes < 0:
        raise BlockFormatError(f"header of {len(header)} bytes runs past the end of a {file_bytes}-byte file")
    try:
        raw = json.loads(bytes(header).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BlockFormatError(f"header is not UTF-8 JSON ({e})") from None
    if not isinstance(raw, dict):
        raise BlockFormatError(f"header must be a JSON object, got {type(raw).__name__}")
    metadata = raw.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BlockFormatError(f"{METADATA_KEY} must map names to strings, got {metadata!r}")
    specs = sorted((_spec(name, entry, data_bytes) for name, entry in raw.items()), key=lambda s: (s.begin, s.end))
    at = 0
    for s in specs:  # sorted, so gaps and overlaps both show up as begin != the previous end
        if s.begin != at:
            kind = "overlaps the previous tensor" if s.begin < at else f"leaves a gap after byte {at}"
            raise BlockFormatError(f"tensor {s.name!r} at [{s.begin}, {s.end}] {kind}")
        at = s.end
    if at != data_bytes:
        raise BlockFormatError(f"tensors cover {at} bytes of a {data_bytes}-byte data region "
                               "(truncated, or trailing bytes)")
    return BlockLayout(data_start, data_bytes, tuple(specs), dict(metadata))


@_refusing
def tensors_from(layout: BlockLayout, data: torch.Tensor) -> dict[str, torch.Tensor]:
    """The block's tensors as views into ``data`` (its data region: uint8, any device).

    A tensor whose offset in the buffer is not a multiple of its element size (safetensors'
    writer never does that, another writer might) is copied instead, since a view would be
    misaligned.
    """
    if sys.byteorder != "little":  # the file is little-endian; views would read it wrongly
        raise BlockFormatError("block files are little-endian; this host is big-endian")
    base = data.storage_offset()
    out: dict[str, torch.Tensor] = {}
    for s in layout.tensors:
        part = data[s.begin:s.end]
        if (base + s.begin) % s.dtype.itemsize:
            part = part.clone()
        out[s.name] = part.view(s.dtype).reshape(s.shape)  # (end-begin,) uint8 -> shape, dtype
    return out
