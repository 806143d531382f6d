"""Wire format of one compressed activation: a msgpack-safe header plus raw frames.

An activation crosses a link as::

    header = {"v": 1,                  # WIRE_VERSION
              "codec": "fmap",         # codec kind that made it (the receiver checks it)
              "dtype": "int8",         # "fp32" | "fp16" | "int8"
              "shape": [N, C, H, W],   # full-width shape of the encoded tensor
              "axis": 1,               # channel axis that ``kept`` indexes
              "kept": [3, 17, ...],    # strictly increasing kept channel indices, or None = all
              "meta": {"out_hw": [H0, W0]}}   # small codec-specific ints (decoder target size)
    frames = [values]                  # fp32 / fp16
             [values, scales]          # int8: one little-endian fp32 scale per kept channel

``values`` holds only the kept channels: the shape with ``shape[axis]`` replaced by
``len(kept)``, C-contiguous, little-endian. Dropped channels are not zeros on the wire;
they cost nothing, and the receiver restores them as zeros.

Everything here is pure numpy/torch. The receiving side (``unpack``) treats header and
frames as untrusted: it checks types, the dtype allow-list, ranks, element counts and how
far the kept channels expand to full width against ``WireLimits``, index ranges and order,
and that every frame has exactly the length the header implies, before it allocates
anything the header asks for.
``simulate`` gives bit-for-bit the tensor that ``unpack(*pack(...))`` returns, without
making bytes; training uses it for the link.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import msgpack
import numpy as np
import torch

from .errors import CodecError, WireFormatError

WIRE_VERSION = 1
# wire dtype name -> little-endian numpy dtype of the value frame
WIRE_DTYPES: dict[str, np.dtype] = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2"), "int8": np.dtype("i1")}
SCALE_DTYPE = np.dtype("<f4")  # int8 per-channel scales
INT8_MAX = 127  # symmetric int8: codes in [-127, 127]
HEADER_KEYS = frozenset({"v", "codec", "dtype", "shape", "axis", "kept", "meta"})
_TORCH_OF = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}
# What one message may make its receiver allocate, refused before anything is allocated. The header, not the
# frames, sets the size of the full-width tensor and of the decoder's output, so without a cap a few kept
# channels under a huge claimed shape turn a small message into gigabytes (a flood amplifier).
MAX_DECODED_ELEMENTS = 1 << 26  # 256 MiB as fp32: the largest fp32 tensor a raw link carries (256 MiB frame cap)
MAX_EXPANSION = 1024  # full-width channels per kept channel: 4096 channels at the smallest budget (4) still fit


@dataclass(frozen=True)
class WireLimits:
    """Bounds a receiver enforces before trusting a header (defaults suit edge boards)."""

    max_ndim: int = 8  # rank of the activation
    max_dim: int = 1 << 24  # largest single dimension
    max_elements: int = MAX_DECODED_ELEMENTS  # full-width elements of one message (what ``unpack`` allocates)
    max_expansion: int = MAX_EXPANSION  # full-width / received values, i.e. shape[axis] / kept channels
    max_decoded_elements: int = MAX_DECODED_ELEMENTS  # elements of a codec decoder's output
    max_codec_chars: int = 64  # length of the codec name
    max_meta_keys: int = 8  # entries in ``meta``
    max_meta_ints: int = 8  # ints in one ``meta`` value
    check_finite: bool = True  # reject NaN/inf values (costs one pass over the payload)


DEFAULT_LIMITS = WireLimits()


@dataclass(frozen=True)
class WireHeader:
    """A validated header."""

    codec: str
    dtype: str
    shape: tuple[int, ...]  # full width
    axis: int
    kept: tuple[int, ...] | None  # None = every channel
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_kept(self) -> int:
        return self.shape[self.axis] if self.kept is None else len(self.kept)

    @property
    def value_shape(self) -> tuple[int, ...]:
        """Shape of the value frame: the full shape with the channel axis cut to ``n_kept``."""
        s = list(self.shape)
        s[self.axis] = self.n_kept
        return tuple(s)

    def frame_nbytes(self) -> list[int]:
        """Exact length of each frame this header implies."""
        sizes = [math.prod(self.value_shape) * WIRE_DTYPES[self.dtype].itemsize]
        if self.dtype == "int8":
            sizes.append(self.n_kept * SCALE_DTYPE.itemsize)
        return sizes


def check_wire_dtype(wire_dtype: str) -> str:
    """Return ``wire_dtype`` if it is allowed, else raise ``CodecError`` listing the allowed ones."""
    if wire_dtype not in WIRE_DTYPES:
        raise CodecError(f"wire dtype {wire_dtype!r} is not supported; use one of {sorted(WIRE_DTYPES)}")
    return wire_dtype


def payload_nbytes(shape: Sequence[int], axis: int, n_kept: int | None, wire_dtype: str) -> int:
    """Bytes of all frames for a tensor of full-width ``shape`` keeping ``n_kept`` channels.

    Args:
        shape: full-width shape including the batch dimension.
        axis: channel axis.
        n_kept: kept channels (None = all).
        wire_dtype: "fp32", "fp16" or "int8" (int8 adds one fp32 scale per kept channel).
    Returns:
        Total frame bytes; divide by ``shape[0]`` for bytes per sample.
    """
    check_wire_dtype(wire_dtype)
    k = shape[axis] if n_kept is None else n_kept
    n = math.prod(shape) // shape[axis] * k
    return n * WIRE_DTYPES[wire_dtype].itemsize + (k * SCALE_DTYPE.itemsize if wire_dtype == "int8" else 0)


def header_nbytes(header: Mapping[str, Any]) -> int:
    """Length of the header once msgpack-encoded (what it costs on the wire)."""
    return len(msgpack.packb(dict(header), use_bin_type=True))


def message_nbytes(header: Mapping[str, Any], frames: Sequence[Any]) -> int:
    """Header (msgpack) plus frame bytes: the application bytes of one message."""
    return header_nbytes(header) + sum(memoryview(f).nbytes for f in frames)


# --- quantisation (shared by pack/unpack and simulate so they agree bit for bit) -------
def quantize(values: torch.Tensor, wire_dtype: str, axis: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cast kept-channel values to the wire dtype.

    int8 is symmetric with one scale per channel: ``scale_c = max|v_c| / 127`` over every
    axis but ``axis`` (1 where a channel is all zeros), codes ``round(v / scale)``.

    Args:
        values: fp32 tensor of kept channels, channel axis ``axis``.
        wire_dtype: "fp32", "fp16" or "int8".
        axis: channel axis.
    Returns:
        (codes in the wire dtype, fp32 scales of shape (k,) or None).
    """
    check_wire_dtype(wire_dtype)
    values = values.detach().float()
    if wire_dtype != "int8":
        return values.to(_TORCH_OF[wire_dtype]), None
    k = values.shape[axis]
    moved = values.movedim(axis, 0).reshape(k, -1)  # (k, everything else)
    amax = moved.abs().amax(dim=1) if moved.shape[1] else torch.zeros(k)
    scales = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))  # (k,)
    codes = torch.round(values / _along(scales, axis, values.dim())).clamp_(-INT8_MAX, INT8_MAX)
    return codes.to(torch.int8), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor | None, axis: int) -> torch.Tensor:
    """Inverse of ``quantize``: fp32 values."""
    values = codes.float()
    if scales is not None:
        values = values * _along(scales.float(), axis, codes.dim())
    return values


def _along(v: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """Reshape a (k,) vector to broadcast along ``axis`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[axis] = v.numel()
    return v.reshape(shape)


def _scatter(values: torch.Tensor, shape: Sequence[int], axis: int, kept: torch.Tensor | None) -> torch.Tensor:
    """Put kept-channel values back at full width, zeros elsewhere."""
    if kept is None:
        return values
    out = torch.zeros(tuple(shape), dtype=values.dtype)
    return out.index_copy_(axis, kept, values)


def _kept_tensor(kept: torch.Tensor | Sequence[int] | None, width: int) -> torch.Tensor | None:
    if kept is None:
        return None
    k = torch.as_tensor(kept, dtype=torch.long).reshape(-1)
    if k.numel() == 0 or k.numel() > width or bool((k[1:] <= k[:-1]).any()) or int(k[0]) < 0 or int(k[-1]) >= width:
        raise CodecError(f"kept channels must be strictly increasing indices in [0, {width}), "
                         f"got {k.tolist()[:16]}{'...' if k.numel() > 16 else ''}")
    return k


# --- sending side ------------------------------------------------------------------------
def pack(z: torch.Tensor, *, codec: str, wire_dtype: str, axis: int,
         kept: torch.Tensor | Sequence[int] | None = None,
         meta: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[memoryview]]:
    """Serialise a full-width activation, sending only the ``kept`` channels.

    Args:
        z: fp32 tensor at full width (already masked/filtered by the codec).
        codec: kind of the codec that made it, checked by the receiver.
        wire_dtype: "fp32", "fp16" or "int8".
        axis: channel axis of ``z``.
        kept: strictly increasing channel indices to send, or None for all.
        meta: small codec-specific ints for the decoder (e.g. target spatial size).
    Returns:
        (header: msgpack-safe dict, frames: C-contiguous byte views, one per frame).
    """
    check_wire_dtype(wire_dtype)
    if not 0 <= axis < z.dim():
        raise CodecError(f"channel axis {axis} is out of range for a {z.dim()}-d tensor of shape {tuple(z.shape)}")
    if z.is_floating_point() and not bool(torch.isfinite(z).all()):
        raise CodecError(f"activation for codec {codec!r} holds NaN or inf; refusing to send it "
                         "(check the model upstream of the cut)")
    k = _kept_tensor(kept, z.shape[axis])
    z = z.detach().to("cpu", torch.float32)
    values = z if k is None else z.index_select(axis, k)  # (.., k, ..)
    codes, scales = quantize(values, wire_dtype, axis)
    if wire_dtype == "fp16" and not bool(torch.isfinite(codes).all()):
        raise CodecError(f"activation for codec {codec!r} overflows fp16 (|x| > 65504); send it as fp32 or int8")
    frames = [_bytes_view(codes, WIRE_DTYPES[wire_dtype])]
    if scales is not None:
        frames.append(_bytes_view(scales, SCALE_DTYPE))
    return make_header(codec=codec, wire_dtype=wire_dtype, shape=z.shape, axis=axis, kept=k, meta=meta), frames


def make_header(*, codec: str, wire_dtype: str, shape: Sequence[int], axis: int,
                kept: torch.Tensor | Sequence[int] | None, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """The header ``pack`` sends for these parameters (also used to predict its size)."""
    kept_list = None if kept is None else [int(i) for i in torch.as_tensor(kept).reshape(-1).tolist()]
    return {"v": WIRE_VERSION, "codec": codec, "dtype": wire_dtype, "shape": [int(s) for s in shape],
            "axis": int(axis), "kept": kept_list, "meta": {str(key): _plain(v) for key, v in (meta or {}).items()}}


def _plain(v: Any) -> int | list[int]:
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v]
    return int(v)


def _bytes_view(t: torch.Tensor, dtype: np.dtype) -> memoryview:
    arr = np.ascontiguousarray(t.contiguous().numpy(), dtype=dtype)  # no copy on little-endian hosts
    return memoryview(arr).cast("B")  # flat bytes, len == nbytes


def simulate(z: torch.Tensor, *, wire_dtype: str, axis: int,
             kept: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """What the receiver reconstructs from ``pack(z, ...)``, without making bytes.

    Args:
        z: tensor at full width (gradients are not tracked).
        wire_dtype: "fp32", "fp16" or "int8".
        axis: channel axis.
        kept: kept channel indices or None.
    Returns:
        fp32 tensor of ``z``'s shape, equal bit for bit to ``unpack(*pack(z, ...))[0]``.
    """
    k = _kept_tensor(kept, z.shape[axis])
    z = z.detach().float()
    values = z if k is None else z.index_select(axis, k.to(z.device))
    codes, scales = quantize(values, wire_dtype, axis)
    out = dequantize(codes, scales, axis)
    if k is None:
        return out
    full = torch.zeros_like(z)
    return full.index_copy_(axis, k.to(z.device), out)


# --- receiving side ----------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_header(header: Any, limits: WireLimits = DEFAULT_LIMITS) -> WireHeader:
    """Validate an untrusted header; raise ``WireFormatError`` saying what is wrong.

    Args:
        header: the decoded msgpack header.
        limits: bounds to enforce.
    Returns:
        The validated header.
    """
    if not isinstance(header, Mapping):
        raise WireFormatError(f"activation header must be a map, got {type(header).__name__}")
    keys = set(header)
    if keys != HEADER_KEYS:
        raise WireFormatError(f"activation header keys must be {sorted(HEADER_KEYS)}; "
                              f"missing {sorted(HEADER_KEYS - keys, key=str)}, unknown {sorted(keys - HEADER_KEYS, key=str)}")
    if header["v"] != WIRE_VERSION or not _is_int(header["v"]):
        raise WireFormatError(f"activation wire version {header['v']!r} is not {WIRE_VERSION}; "
                              "upgrade the older side so both speak the same version")
    codec = header["codec"]
    if not isinstance(codec, str) or not 0 < len(codec) <= limits.max_codec_chars:
        raise WireFormatError(f"codec name must be a string of 1..{limits.max_codec_chars} chars, got {codec!r:.80}")
    dtype = header["dtype"]
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise WireFormatError(f"wire dtype {dtype!r:.40} is not allowed; expected one of {sorted(WIRE_DTYPES)}")
    shape = header["shape"]
    if (not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= limits.max_ndim
            or not all(_is_int(s) and 1 <= s <= limits.max_dim for s in shape)):
        raise WireFormatError(f"shape must be 1..{limits.max_ndim} ints in [1, {limits.max_dim}], got {shape!r:.120}")
    shape = tuple(shape)
    if math.prod(shape) > limits.max_elements:
        raise WireFormatError(f"shape {shape} has {math.prod(shape)} elements, more than the limit "
                              f"{limits.max_elements}; raise WireLimits.max_elements if this is legitimate")
    axis = header["axis"]
    if not _is_int(axis) or not 0 <= axis < len(shape):
        raise WireFormatError(f"channel axis must be an int in [0, {len(shape)}), got {axis!r:.40}")
    kept = header["kept"]
    if kept is not None:
        width = shape[axis]
        if (not isinstance(kept, (list, tuple)) or not 1 <= len(kept) <= width
                or not all(_is_int(i) for i in kept)):
            raise WireFormatError(f"kept must be None or a list of 1..{width} ints, got {str(kept)[:120]}")
        if not (0 <= kept[0] and kept[-1] < width and all(a < b for a, b in zip(kept, kept[1:]))):
            raise WireFormatError(f"kept channel indices must be strictly increasing in [0, {width}), "
                                  f"got {str(kept)[:120]}")
        kept = tuple(kept)
        if width > len(kept) * limits.max_expansion:  # bounds the full-width tensor by the frame's length
            raise WireFormatError(f"header keeps {len(kept)} of {width} channels: {width / len(kept):.0f}x "
                                  f"expansion of the received values, more than the limit {limits.max_expansion}; "
                                  "raise WireLimits.max_expansion if this is legitimate")
    meta = header["meta"]
    if not isinstance(meta, Mapping) or len(meta) > limits.max_meta_keys:
        raise WireFormatError(f"meta must be a map of at most {limits.max_meta_keys} entries, got {str(meta)[:120]}")
    for key, v in meta.items():
        ok = _is_int(v) or (isinstance(v, (list, tuple)) and len(v) <= limits.max_meta_ints and all(map(_is_int, v)))
        if not isinstance(key, str) or len(key) > 32 or not ok:
            raise WireFormatError(f"meta entries must be short names mapped to an int or at most "
                                  f"{limits.max_meta_ints} ints, got {key!r:.40}: {v!r:.80}")
    return WireHeader(codec=codec, dtype=dtype, shape=shape, axis=axis, kept=kept, meta=dict(meta))


def _frame_bytes(frame: Any, index: int) -> memoryview:
    try:
        view = memoryview(frame)
    except TypeError:
        raise WireFormatError(f"frame {index} is a {type(frame).__name__}, not a bytes-like buffer") from None
    if not view.c_contiguous:
        raise WireFormatError(f"frame {index} is not C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def unpack(header: Any, frames: Sequence[Any], limits: WireLimits = DEFAULT_LIMITS,
           check: Callable[[WireHeader], None] | None = None) -> tuple[torch.Tensor, WireHeader]:
    """Validate and deserialise one activation.

    Args:
        header: decoded msgpack header (untrusted).
        frames: bytes-like frames (bytes, memoryview, numpy array, zmq.Frame, ...).
        limits: bounds to enforce.
        check: called with the validated header before the frames are touched (the codec's
            own checks: kind, rank, width), so nothing is allocated for a header it rejects.
    Returns:
        (fp32 tensor of the header's full-width shape with dropped channels as zeros,
        the validated header).
    Raises:
        WireFormatError: the header is malformed or the frames do not match it.
    """
    h = parse_header(header, limits)
    if check is not None:
        check(h)
    if not isinstance(frames, (list, tuple)):
        raise WireFormatError(f"frames must be a list of byte buffers, got {type(frames).__name__}")
    want = h.frame_nbytes()
    if len(frames) != len(want):
        raise WireFormatError(f"a {h.dtype} activation has {len(want)} frame(s), got {len(frames)}")
    views = [_frame_bytes(f, i) for i, f in enumerate(frames)]
    got = [v.nbytes for v in views]
    if got != want:
        raise WireFormatError(f"frame lengths {got} do not match header (shape {list(h.shape)}, "
                              f"{h.n_kept} kept channels, {h.dtype}) which implies {want} bytes")
    codes = torch.from_numpy(np.frombuffer(views[0], dtype=WIRE_DTYPES[h.dtype]).astype(
        WIRE_DTYPES[h.dtype].newbyteorder("="), copy=True)).reshape(h.value_shape)
    scales = None
    if h.dtype == "int8":
        scales = torch.from_numpy(np.frombuffer(views[1], dtype=SCALE_DTYPE).astype(np.float32, copy=True))
        if not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
            raise WireFormatError("int8 scales must be finite and positive")
    elif limits.check_finite and not bool(torch.isfinite(codes).all()):
        raise WireFormatError(f"{h.dtype} activation values contain NaN or inf")
    values = dequantize(codes, scales, h.axis)
    kept = None if h.kept is None else torch.tensor(h.kept, dtype=torch.long)
    return _scatter(values, h.shape, h.axis, kept), h
