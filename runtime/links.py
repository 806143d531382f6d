"""The per-link codec seam: what a worker applies to an activation before sending it and after receiving it.

A plan gives every cut (link between stage k and k+1) a :class:`LinkSpec`; the sending
worker encodes with it, the receiving worker decodes with it. ``raw`` (the default) sends
the tensor as it is, so the split output equals the unsplit one bit for bit. Any other
name is a codec of ``edgesplit.compression``::

    header, frames = codec.encode(x, budget, wire_dtype)   # header -> "cmeta", frames -> payload
    x = codec.decode(header, frames)                       # validates untrusted input

A name found in the model manifest's ``extra["codecs"]`` is a trained codec stored as a
block (loaded with ``compression.load_codec``; the worker fetches its block like any
other); otherwise it is a registered kind without weights (``create_codec``, e.g.
"identity" for fp16/int8 casts). The codec's name travels in each message (``cod``), so a
receiver refuses an activation encoded for another link. The first link (client -> stage 0)
and the last (last stage -> client) stay raw.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from edgesplit.partitioner import BlockStore, ModelManifest

from .errors import ConfigError, ProtocolError

RAW = "raw"
DEFAULT_WIRE_DTYPE = "fp16"  # what a named codec sends when the plan does not say


class LinkCodec(Protocol):
    """What the runtime needs from a split-point codec (``edgesplit.compression.Codec`` has it)."""

    def encode(self, x: torch.Tensor, budget: int | None, wire_dtype: str) -> tuple[dict[str, Any], list[Any]]:
        ...

    def decode(self, header: Any, frames: Sequence[Any]) -> torch.Tensor:
        ...


@dataclass(frozen=True)
class LinkSpec:
    """The codec settings of one cut, as a plan carries them."""

    codec: str = RAW  # "raw", a name in manifest.extra["codecs"], or a registered codec kind
    budget: int | None = None  # channels kept (None = full width)
    wire_dtype: str | None = None  # "fp32", "fp16" or "int8" (default DEFAULT_WIRE_DTYPE)

    @property
    def is_raw(self) -> bool:
        return self.codec == RAW

    def to_msg(self) -> dict[str, Any]:
        return {"codec": self.codec, "budget": self.budget, "wire_dtype": self.wire_dtype}

    @classmethod
    def from_msg(cls, v: Any) -> "LinkSpec":
        if v is None:
            return cls()
        if not isinstance(v, dict) or not isinstance(v.get("codec", RAW), str) or not 0 < len(v.get("codec", RAW)) <= 64:
            raise ProtocolError("bad message: a link spec is {codec: name, budget: int|None, wire_dtype: str|None}")
        budget, wd = v.get("budget"), v.get("wire_dtype")
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0):
            raise ProtocolError("bad message: link budget must be a positive int or None")
        if wd is not None and (not isinstance(wd, str) or len(wd) > 16):
            raise ProtocolError("bad message: wire_dtype must be a short string")
        return cls(v.get("codec", RAW), budget, wd)


def _compression() -> Any:
    try:
        return importlib.import_module("edgesplit.compression")
    except ImportError as e:
        raise ConfigError(f"link codecs other than {RAW!r} need edgesplit.compression ({e})") from None


def codec_block(spec: LinkSpec, manifest: ModelManifest) -> str | None:
    """The block id a link's trained codec is stored as (None: raw or weightless)."""
    desc = (manifest.extra.get("codecs") or {}).get(spec.codec) if not spec.is_raw else None
    block = desc.get("block") if isinstance(desc, dict) else None
    return block if isinstance(block, str) else None


def create_link_codec(spec: LinkSpec, manifest: ModelManifest | None = None, store: BlockStore | None = None,
                      device: str | torch.device = "cpu") -> LinkCodec | None:
    """The codec object of a link (None for raw).

    Args:
        spec: the link's settings.
        manifest: the model's manifest (where trained codecs are described).
        store: where a trained codec's block is (already fetched).
        device: where its modules run.
    """
    if spec.is_raw:
        return None
    comp = _compression()
    desc = (manifest.extra.get("codecs") or {}).get(spec.codec) if manifest is not None else None
    if desc is not None:
        if store is None:
            raise ConfigError(f"codec {spec.codec!r} is a trained codec; loading it needs the block store")
        return comp.load_codec(store, desc, device)
    if spec.codec not in comp.list_codecs():
        known = sorted((manifest.extra.get("codecs") or {}) if manifest is not None else [])
        raise ConfigError(f"link codec {spec.codec!r} is unknown: not in the manifest's codecs {known} "
                          f"nor a registered kind {comp.list_codecs()}")
    return comp.create_codec(spec.codec).to(device)


def encode_link(codec: LinkCodec | None, spec: LinkSpec, y: torch.Tensor) -> tuple[dict[str, Any], list[Any]]:
    """Sender side of a link: (codec metadata for ``cmeta``, payload frames)."""
    if codec is None:
        return {}, [y]
    return codec.encode(y, budget=spec.budget, wire_dtype=spec.wire_dtype or DEFAULT_WIRE_DTYPE)


def decode_link(codec: LinkCodec | None, spec: LinkSpec, cod: str, cmeta: dict[str, Any],
                tensors: Any, blobs: Any) -> torch.Tensor:
    """Receiver side: check the message was encoded for this link, then restore the activation.

    Args:
        cod: codec name from the message header ("raw" when absent).
        tensors: callable -> the payload as tensors (raw links).
        blobs: callable -> the payload as byte views (codec links).
    """
    if cod != spec.codec:
        raise ProtocolError(f"activation encoded with link codec {cod!r}, but this link decodes {spec.codec!r}")
    if codec is None:
        ts = tensors()
        if len(ts) != 1:
            raise ProtocolError(f"a raw link carries exactly 1 tensor frame, got {len(ts)}")
        return ts[0]
    return codec.decode(cmeta, blobs())
