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

The budget is the sender's alone (the receiver reads the kept channels from each message's
header), so it changes on a live cluster without a redeploy: ``Client.set_link`` sends a
LINK order through the coordinator to the cut's sending worker, which swaps the stage's
``LinkSpec`` between two requests. With ``rate`` set (bytes/s the coordinator allocated to
the link), the sender picks the budget per transfer by ``compression.plan_transfer``: the
largest budget up to ``budget`` (None: full width) whose message fits in
``rate x share x`` the request's remaining time. ``rate="measured"`` uses the rate the
sending worker measures on that link (:class:`RateMeter`, from its sends and their ACKs).
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from edgesplit.partitioner import BlockStore, ModelManifest

from .errors import ConfigError, ProtocolError

RAW = "raw"
MIN_TRANSFER_S = 1e-4  # a send-to-receipt time below this is not taken as a rate sample
MEASURED = "measured"  # LinkSpec.rate: follow the rate the sender measures on the link
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
    budget: int | None = None  # channels kept (None = full width); with ``rate``, the most kept
    wire_dtype: str | None = None  # "fp32", "fp16" or "int8" (default DEFAULT_WIRE_DTYPE)
    rate: float | str | None = None  # bytes/s allocated, or "measured": the budget then follows it per transfer
    share: float = 0.5  # with ``rate``: the fraction of a request's remaining time this transfer may take

    @property
    def is_raw(self) -> bool:
        return self.codec == RAW

    def to_msg(self) -> dict[str, Any]:
        return {"codec": self.codec, "budget": self.budget, "wire_dtype": self.wire_dtype, "rate": self.rate,
                "share": self.share}

    def changed(self, changes: Any) -> "LinkSpec":
        """This spec with ``changes`` (a LINK order's map) applied; the codec itself cannot change live."""
        if not isinstance(changes, dict) or not set(changes) <= {"codec", "budget", "wire_dtype", "rate", "share"}:
            raise ProtocolError("bad message: a link change is a map of budget, wire_dtype, rate and share")
        if changes.get("codec", self.codec) != self.codec:
            raise ConfigError(f"a link's codec cannot change live ({self.codec!r} -> {changes['codec']!r}): "
                              "the receiver has to load it; redeploy with the new codec")
        return LinkSpec.from_msg({**self.to_msg(), **changes})

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
        rate, share = v.get("rate"), v.get("share", 0.5)
        if rate is not None and rate != MEASURED and (not isinstance(rate, (int, float)) or isinstance(rate, bool)
                                                      or not math.isfinite(rate) or rate <= 0):
            raise ProtocolError(f"bad message: link rate must be a positive number of bytes/s, {MEASURED!r} or None")
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 < share <= 1:
            raise ProtocolError("bad message: link share must be a number in (0, 1]")
        return cls(v.get("codec", RAW), budget, wd, rate if rate in (None, MEASURED) else float(rate), float(share))


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


def check_link(codec: LinkCodec | None, spec: LinkSpec) -> None:
    """Refuse settings the link's codec cannot send (before they reach a request).

    Raises:
        ConfigError: a budget or wire dtype on a raw link, or one the codec does not serve.
    """
    if codec is None:
        if spec.budget is not None or spec.wire_dtype is not None or spec.rate is not None:
            raise ConfigError("this link is raw (no codec): budgets, wire dtypes and rates need a codec; "
                              "deploy the plan with a codec on this cut")
        return
    budgets = tuple(getattr(codec, "budgets", ()))
    if spec.budget is not None and spec.budget not in budgets:
        raise ConfigError(f"link codec {spec.codec!r} serves budgets {list(budgets)} (or None = full width), "
                          f"not {spec.budget}")
    if spec.wire_dtype is not None and spec.wire_dtype not in _compression().WIRE_DTYPES:
        raise ConfigError(f"wire dtype {spec.wire_dtype!r} is not one of {sorted(_compression().WIRE_DTYPES)}")


class RateMeter:
    """The rate of one outgoing link, measured from sends to their receipt (bytes/s, EWMA).

    A transfer starts at its send, or at the previous receipt by the same peer when that came
    later (the link was still busy with the message before), and ends at its receipt: the
    ACK's arrival less the time the receiver held the input (its ``held``: queue and compute
    before it acknowledged), so the next stage's compute is not taken for link time. Messages
    under ``min_bytes`` time the round trip rather than the rate and are not counted, so the
    estimate stays at the last large transfer's while only small ones go.
    """

    def __init__(self, alpha: float = 0.3, min_bytes: int = 16 * 1024) -> None:
        self.alpha, self.min_bytes = alpha, min_bytes
        self.rate: float | None = None  # bytes/s; None until a large enough transfer was acked
        self._last_ack = -math.inf

    def observe(self, nbytes: int, t_send: float, t_received: float) -> None:
        start, self._last_ack = max(t_send, self._last_ack), max(self._last_ack, t_received)
        if nbytes < self.min_bytes or t_received - start < MIN_TRANSFER_S:  # too short to be a rate (or a
            return  # receiver's ``held`` claiming almost the whole round trip)
        sample = nbytes / (t_received - start)
        self.rate = sample if self.rate is None else (1 - self.alpha) * self.rate + self.alpha * sample


def link_budget(codec: Any, spec: LinkSpec, shape: Sequence[int], remaining_s: float,
                measured_rate: float | None = None) -> int | None:
    """The budget of one transfer: ``spec.budget``, or with ``spec.rate`` the policy's choice up to it.

    Args:
        measured_rate: the sender's measurement of this link (used when ``spec.rate`` is "measured";
            None = not measured yet, so ``spec.budget`` goes).
    """
    rate = measured_rate if spec.rate == MEASURED else spec.rate
    if rate is None or not getattr(codec, "budgets", ()):
        return spec.budget
    candidates = [b for b in codec.budgets if spec.budget is None or b <= spec.budget]
    candidates += [None] if spec.budget is None else []
    sizes = codec.bytes_per_budget(shape, spec.wire_dtype or DEFAULT_WIRE_DTYPE)
    return _compression().choose_budget(float(rate), max(0.0, remaining_s) * spec.share, candidates, sizes)


def encode_link(codec: LinkCodec | None, spec: LinkSpec, y: torch.Tensor, remaining_s: float = math.inf,
                measured_rate: float | None = None) -> tuple[dict[str, Any], list[Any]]:
    """Sender side of a link: (codec metadata for ``cmeta``, payload frames).

    Args:
        remaining_s: time left to the request's deadline (used when the link follows a rate).
        measured_rate: the sender's measured rate of the link, bytes/s (for ``rate="measured"``).
    """
    if codec is None:
        return {}, [y]
    budget = link_budget(codec, spec, tuple(y.shape), remaining_s, measured_rate)
    return codec.encode(y, budget=budget, wire_dtype=spec.wire_dtype or DEFAULT_WIRE_DTYPE)


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
