"""Split-point codecs and their registry (Mudvari et al., ACM TOIT 2024; amudvari/VCCprune).

A codec sits on one link: the sending worker calls ``encode`` (encoder, channel filter,
budget mask, wire dtype) and the receiving worker calls ``decode`` (validation, then the
decoder). Kinds:

- ``"fmap"``: feature maps (N, C, H, W). Encoder = Conv2d(k=2+r, stride r, padding r) →
  BN → sigmoid, times sigmoid(p); decoder = ConvTranspose2d → BN → ReLU (the reference's
  ``encodingUnit``/``decodingUnit``; r = 2 also halves H and W). The decoder's BN keeps
  running statistics per budget (``BudgetNorm``) so one module can serve every budget.
- ``"tokens"``: token sequences (N, T, D) of a ViT. The same idea over the embedding
  dimension: Linear → BN → sigmoid, times sigmoid(p); decoder Linear → BN, with no ReLU
  because a transformer's residual stream is signed.
- ``"identity"``: no learned parts; any float tensor in fp32/fp16/int8, always full width.
  For links without a trained codec.

Budget ``None`` means full width with no mask (the reference's uncompressed mode); an int
budget b keeps the top-b channels by sigmoid(p)^2 (see ``filters``). Inference calls do not
switch train/eval mode: ``create_codec`` and ``load_codec`` return modules in eval mode.

Usage::

    codec = create_codec("fmap", channels=256, r=1)
    header, frames = codec.encode(h, budget=8, wire_dtype="int8")   # sender
    h_hat = codec.decode(header, frames)                            # receiver
"""
from __future__ import annotations

import fnmatch
import math
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import nn

from . import wire
from .budget_norm import BudgetNorm
from .errors import CodecError, WireFormatError
from .filters import FILTER_INIT_SCALE, budget_mask
from .wire import DEFAULT_LIMITS, WireLimits

MIN_BUDGET = 4  # smallest budget the paper uses


def nested_budgets(channels: int, min_budget: int = MIN_BUDGET) -> tuple[int, ...]:
    """Powers of two from ``min_budget`` up to, not including, ``channels`` (full width is None)."""
    out, b = [], min_budget
    while b < channels:
        out.append(b)
        b *= 2
    return tuple(out)


class Codec(nn.Module):
    """Base of every codec: a sender half, a receiver half and the link between them."""

    kind: ClassVar[str] = ""
    axis: ClassVar[int] = 1  # channel axis of the encoded tensor

    def __init__(self, **config: Any) -> None:
        super().__init__()
        self._config = dict(config)

    # --- description -------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Constructor kwargs (JSON-safe): ``create_codec(codec.kind, **codec.config())`` rebuilds it."""
        return dict(self._config)

    @property
    def budgets(self) -> tuple[int, ...]:
        """Integer budgets this codec serves, ascending; None (full width) is always allowed too."""
        return ()

    # --- the three stages ----------------------------------------------------------------
    def encode_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Sender half (differentiable): the full-width tensor that would cross the link."""
        return x

    def mask(self, budget: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(sorted kept indices, (C,) channel mask) at ``budget``; (None, None) at full width."""
        if budget is not None:
            raise CodecError(f"codec {self.kind!r} has no channel filter: use budget=None, got {budget!r}")
        return None, None

    def link_meta(self, x: torch.Tensor) -> dict[str, Any]:
        """Small ints the receiver needs besides the tensor (e.g. the original spatial size)."""
        return {}

    def decode_tensor(self, z: torch.Tensor, meta: Mapping[str, Any], budget: int | None = None) -> torch.Tensor:
        """Receiver half (differentiable): restore the activation the next stage expects.

        Args:
            z: received tensor at full width (dropped channels are zeros).
            meta: the header's ``meta``.
            budget: the budget it was sent at (None = full width); picks the decoder's statistics.
        """
        return z

    def check_received(self, h: wire.WireHeader) -> None:
        """Raise ``WireFormatError`` if a validated header does not fit this codec."""

    def decoded_shape(self, h: wire.WireHeader) -> tuple[int, ...]:
        """Shape ``decode`` returns for a header that passed ``check_received``.

        Known from the header alone, so the receiver can refuse an oversized output before
        the decoder allocates it. The default is the full-width shape (``decode_tensor`` as identity).
        """
        return h.shape

    # --- inference API ---------------------------------------------------------------------
    def _channel_axis(self, ndim: int) -> int:
        return self.axis

    def _masked(self, x: torch.Tensor, budget: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = self.encode_tensor(x)
        kept, m = self.mask(budget)
        if m is not None:
            axis = self._channel_axis(z.dim())
            z = z * m.to(z).reshape([-1 if d == axis else 1 for d in range(z.dim())])
        return z, kept

    def forward(self, x: torch.Tensor, budget: int | None = None, wire_dtype: str = "fp32") -> torch.Tensor:
        """Sender, link and receiver in one call; equal bit for bit to ``decode(*encode(...))``.

        Under autograd the link is straight-through (dropped channels get no gradient), so
        the whole codec can also be trained end to end with this call.

        Args:
            x: activation at the cut.
            budget: channels to keep (one of ``budgets``) or None for full width.
            wire_dtype: "fp32", "fp16" or "int8".
        Returns:
            The activation as the next stage sees it.
        """
        z, kept = self._masked(x, budget)
        z_hat = wire.simulate(z, wire_dtype=wire_dtype, axis=self._channel_axis(z.dim()), kept=kept).to(z.device)
        if torch.is_grad_enabled() and z.requires_grad:
            # straight-through: values as received, gradients as through the (masked) identity
            z_hat = z + (z_hat - z).detach()
        return self.decode_tensor(z_hat, self.link_meta(x), budget)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, budget: int | None = None,
               wire_dtype: str = "fp16") -> tuple[dict[str, Any], list[memoryview]]:
        """Sender side: compress ``x`` into a msgpack-safe header and raw frames.

        Args:
            x: activation at the cut, batch first.
            budget: channels to keep or None for full width.
            wire_dtype: "fp32", "fp16" or "int8".
        Returns:
            (header, frames); only kept channels are in the frames, their indices in the header.
        """
        wire.check_wire_dtype(wire_dtype)
        z, kept = self._masked(x, budget)
        return wire.pack(z, codec=self.kind, wire_dtype=wire_dtype, axis=self._channel_axis(z.dim()),
                         kept=kept, meta=self.link_meta(x))

    @torch.no_grad()
    def decode(self, header: Any, frames: Sequence[Any], limits: WireLimits = DEFAULT_LIMITS) -> torch.Tensor:
        """Receiver side: validate an untrusted header/frames pair and restore the activation.

        Args:
            header: decoded msgpack header from the peer.
            frames: bytes-like frames from the peer.
            limits: bounds on what a header may ask for.
        Returns:
            The activation for the next stage, on this codec's device.
        Raises:
            WireFormatError: malformed, inconsistent, made by another codec/shape, or asking for more
                memory than ``limits`` allow (refused before anything that size is allocated).
        """
        z, h = wire.unpack(header, frames, limits, check=lambda hdr: self._check_header(hdr, limits))
        return self.decode_tensor(z.to(self._device()), h.meta, None if h.kept is None else len(h.kept))

    def _check_header(self, h: wire.WireHeader, limits: WireLimits = DEFAULT_LIMITS) -> None:
        """The codec's checks, then the size of its output: everything a header can make this side allocate.

        ``wire.parse_header`` has bounded the full-width tensor (``max_elements``, and ``max_expansion``
        times the values received); ``check_received`` ties the header to this codec's own width,
        budgets and meta, so the decoder's growth is the codec's fixed one; the output is capped here.
        """
        if h.codec != self.kind:
            raise WireFormatError(f"activation was encoded by codec {h.codec!r} but this link decodes "
                                  f"{self.kind!r}; both ends must use the plan's codec for this link")
        self.check_received(h)
        out = self.decoded_shape(h)
        n = math.prod(out)
        if n > limits.max_decoded_elements:
            raise WireFormatError(f"codec {self.kind!r} would decode header shape {list(h.shape)} "
                                  f"({h.n_kept} channels received) to {list(out)}: {n} elements, more than the "
                                  f"limit {limits.max_decoded_elements}; raise WireLimits.max_decoded_elements "
                                  "if this is legitimate")

    # --- accounting -------------------------------------------------------------------------
    def encoded_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Full-width shape of ``encode_tensor`` for an input of ``input_shape`` (batch included)."""
        return tuple(int(s) for s in input_shape)

    def wire_nbytes(self, input_shape: Sequence[int], budget: int | None, wire_dtype: str,
                    header: bool = True) -> int:
        """Bytes of one message for an input of ``input_shape`` (batch included).

        Args:
            input_shape: shape of the activation given to ``encode``.
            budget: channels kept (None = full width).
            wire_dtype: "fp32", "fp16" or "int8".
            header: add the msgpack header's length (exact for the current filter).
        Returns:
            Frame bytes (plus header bytes) of ``encode(x, budget, wire_dtype)``.
        """
        shape = self.encoded_shape(input_shape)
        axis = self._channel_axis(len(shape))
        kept, _ = self.mask(budget)
        n = wire.payload_nbytes(shape, axis, None if kept is None else kept.numel(), wire_dtype)
        if header:
            meta = self._meta_for_shape(input_shape)
            n += wire.header_nbytes(wire.make_header(codec=self.kind, wire_dtype=wire_dtype, shape=shape,
                                                     axis=axis, kept=kept, meta=meta))
        return n

    def bytes_per_budget(self, input_shape: Sequence[int], wire_dtype: str,
                         header: bool = True) -> dict[int | None, int]:
        """``wire_nbytes`` for every budget and for full width (None)."""
        return {b: self.wire_nbytes(input_shape, b, wire_dtype, header) for b in (*self.budgets, None)}

    def _meta_for_shape(self, input_shape: Sequence[int]) -> dict[str, Any]:
        return {}

    def _device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        return torch.device("cpu")


class FilteredCodec(Codec):
    """A codec with an encoder, a trainable per-channel filter p and a decoder."""

    encoder: nn.Module
    decoder: nn.Module
    ndim: ClassVar[int] = 0  # rank of the encoded tensor

    def __init__(self, width: int, min_budget: int, filter_init_scale: float, **config: Any) -> None:
        super().__init__(min_budget=min_budget, filter_init_scale=filter_init_scale, **config)
        if width < 1:
            raise CodecError(f"codec width must be >= 1, got {width}")
        self.width = width
        self._budgets = nested_budgets(width, min_budget)
        # p in the paper: sigmoid(p) scales each channel; sigmoid(p)^2 ranks channels for budgets
        self.filter_logits = nn.Parameter(filter_init_scale * torch.rand(width))

    @property
    def budgets(self) -> tuple[int, ...]:
        return self._budgets

    def mask(self, budget: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if budget is not None and (isinstance(budget, bool) or budget not in self._budgets):
            raise CodecError(f"budget must be one of {self._budgets} (or None for full width), got {budget!r}")
        return budget_mask(self.filter_logits, budget)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters that live on the sending side (encoder and filter)."""
        return [*self.encoder.parameters(), self.filter_logits]

    def decoder_parameters(self) -> list[nn.Parameter]:
        """Parameters that live on the receiving side."""
        return list(self.decoder.parameters())

    def _filter_view(self, ndim: int) -> torch.Tensor:
        axis = self._channel_axis(ndim)
        return torch.sigmoid(self.filter_logits).reshape([-1 if d == axis else 1 for d in range(ndim)])

    def check_received(self, h: wire.WireHeader) -> None:
        if len(h.shape) != self.ndim or h.axis != self.axis or h.shape[h.axis] != self.width:
            raise WireFormatError(f"codec {self.kind!r} expects a {self.ndim}-d tensor with {self.width} "
                                  f"channels on axis {self.axis}, header says shape {list(h.shape)} axis {h.axis}")
        if h.kept is not None and len(h.kept) not in self._budgets:
            raise WireFormatError(f"codec {self.kind!r} serves budgets {self._budgets} (or all channels), "
                                  f"header keeps {len(h.kept)} channels")


_REGISTRY: dict[str, Callable[..., Codec]] = {}


def register_codec(name: str) -> Callable[[type[Codec]], type[Codec]]:
    """Class decorator: make a codec creatable by ``create_codec(name, ...)``."""
    def wrap(cls: type[Codec]) -> type[Codec]:
        if name in _REGISTRY:
            raise CodecError(f"codec {name!r} is already registered")
        cls.kind = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def list_codecs(pattern: str = "*") -> list[str]:
    """Registered codec kinds matching a shell-style ``pattern``, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def create_codec(kind: str, **kwargs: Any) -> Codec:
    """Build a codec by kind, in eval mode (call ``.train()`` to train it).

    Args:
        kind: one of ``list_codecs()``.
        **kwargs: the kind's constructor arguments (e.g. ``channels=256, r=1`` for "fmap").
    Returns:
        The codec.
    """
    if kind not in _REGISTRY:
        raise CodecError(f"unknown codec {kind!r}; registered: {list_codecs()}")
    try:
        codec = _REGISTRY[kind](**kwargs)
    except TypeError as e:
        raise CodecError(f"bad arguments for codec {kind!r}: {e}") from None
    return codec.eval()


@register_codec("identity")
class IdentityCodec(Codec):
    """Any float tensor, full width, as fp32/fp16/int8 (int8 scales along ``axis``)."""

    def __init__(self, axis: int = 1) -> None:
        super().__init__(axis=axis)
        if isinstance(axis, bool) or not isinstance(axis, int) or axis < 0:
            raise CodecError(f"identity codec axis must be an int >= 0, got {axis!r}")
        self.channel_axis = axis

    def _channel_axis(self, ndim: int) -> int:
        return min(self.channel_axis, ndim - 1)  # 1-d tensors: one scale per element

    def encode_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise CodecError(f"the identity codec sends float tensors, got {x.dtype}; cast it first")
        return x

    def check_received(self, h: wire.WireHeader) -> None:
        if h.kept is not None or h.meta:
            raise WireFormatError(f"identity activations carry every channel and no meta, got "
                                  f"{h.n_kept} kept channel(s) and meta {h.meta}")


@register_codec("fmap")
class FeatureMapCodec(FilteredCodec):
    """Feature maps (N, C, H, W): strided conv encoder + channel filter, transposed-conv decoder."""

    axis = 1
    ndim = 4

    def __init__(self, channels: int, r: int = 1, enc_channels: int | None = None,
                 min_budget: int = MIN_BUDGET, filter_init_scale: float = FILTER_INIT_SCALE) -> None:
        """
        Args:
            channels: C of the activation at the cut.
            r: spatial reduction (1 keeps H, W; 2 roughly halves them); kernel 2+r, stride r, pad r.
            enc_channels: channels on the wire before the budget (default C, as in the paper).
            min_budget: smallest budget offered.
            filter_init_scale: p ~ scale * U(0, 1).
        """
        enc = channels if enc_channels is None else enc_channels
        if channels < 1 or r not in (1, 2, 3):
            raise CodecError(f"fmap codec needs channels >= 1 and r in (1, 2, 3), got channels={channels}, r={r}")
        super().__init__(enc, min_budget, filter_init_scale, channels=channels, r=r, enc_channels=enc_channels)
        self.channels, self.r = channels, r
        k = 2 + r
        self.encoder = nn.Sequential(nn.Conv2d(channels, enc, k, stride=r, padding=r),
                                     nn.BatchNorm2d(enc, momentum=0.03, eps=1e-4), nn.Sigmoid())
        self.decoder = nn.ModuleDict({"conv": nn.ConvTranspose2d(enc, channels, k, stride=r, padding=r),
                                      "bn": BudgetNorm(channels, self.budgets)})

    def encode_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise CodecError(f"fmap codec expects (N, {self.channels}, H, W), got {tuple(x.shape)}")
        return self.encoder(x) * self._filter_view(4)  # (N, C', H', W')

    def link_meta(self, x: torch.Tensor) -> dict[str, Any]:
        return {"out_hw": [int(x.shape[2]), int(x.shape[3])]}

    def _meta_for_shape(self, input_shape: Sequence[int]) -> dict[str, Any]:
        return {"out_hw": [int(input_shape[2]), int(input_shape[3])]}

    def encoded_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        n, _, h, w = input_shape
        return (int(n), self.width, self._enc_size(h), self._enc_size(w))

    def _enc_size(self, s: int) -> int:
        return (s + 2 * self.r - (2 + self.r)) // self.r + 1

    def _out_range(self, s: int) -> tuple[int, int]:
        lo = (s - 1) * self.r - 2 * self.r + (2 + self.r)  # ConvTranspose2d without output padding
        return lo, lo + self.r - 1

    def decoded_shape(self, h: wire.WireHeader) -> tuple[int, ...]:
        out_h, out_w = h.meta["out_hw"]
        return (h.shape[0], self.channels, out_h, out_w)

    def decode_tensor(self, z: torch.Tensor, meta: Mapping[str, Any], budget: int | None = None) -> torch.Tensor:
        out_hw = list(meta["out_hw"]) if "out_hw" in meta else None
        y = self.decoder["conv"](z, output_size=out_hw)  # (N, C, H, W)
        return torch.relu(self.decoder["bn"](y, budget))

    def check_received(self, h: wire.WireHeader) -> None:
        super().check_received(h)
        out_hw = h.meta.get("out_hw")
        ok = isinstance(out_hw, list) and len(out_hw) == 2 and set(h.meta) == {"out_hw"}
        if ok:
            for s, o in zip(h.shape[2:], out_hw):
                lo, hi = self._out_range(s)
                ok = ok and lo <= o <= hi
        if not ok:
            raise WireFormatError(f"fmap header meta must be {{'out_hw': [H, W]}} reachable from the encoded "
                                  f"size {list(h.shape[2:])} with r={self.r}, got {h.meta}")


@register_codec("tokens")
class TokenCodec(FilteredCodec):
    """Token sequences (N, T, D): linear encoder + filter over D, linear decoder."""

    axis = 2
    ndim = 3

    def __init__(self, dim: int, enc_dim: int | None = None, min_budget: int = MIN_BUDGET,
                 filter_init_scale: float = FILTER_INIT_SCALE) -> None:
        """
        Args:
            dim: D, the embedding width at the cut.
            enc_dim: width on the wire before the budget (default D).
            min_budget: smallest budget offered.
            filter_init_scale: p ~ scale * U(0, 1).
        """
        enc = dim if enc_dim is None else enc_dim
        if dim < 1:
            raise CodecError(f"tokens codec needs dim >= 1, got {dim}")
        super().__init__(enc, min_budget, filter_init_scale, dim=dim, enc_dim=enc_dim)
        self.dim = dim
        # NOTE: BN momentum 0.1, not the conv encoder's 0.03: a ViT's residual stream drifts fast
        # while training, and slow running statistics made held-out accuracy swing by tens of points
        self.encoder = nn.ModuleDict({"fc": nn.Linear(dim, enc), "bn": nn.BatchNorm1d(enc, eps=1e-4)})
        self.decoder = nn.ModuleDict({"fc": nn.Linear(enc, dim), "bn": BudgetNorm(dim, self.budgets)})

    def encode_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[2] != self.dim:
            raise CodecError(f"tokens codec expects (N, T, {self.dim}), got {tuple(x.shape)}")
        n, t, _ = x.shape
        y = self.encoder["bn"](self.encoder["fc"](x).reshape(n * t, -1)).reshape(n, t, -1)  # (N, T, D')
        return torch.sigmoid(y) * self._filter_view(3)

    def encoded_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        n, t, _ = input_shape
        return (int(n), int(t), self.width)

    def decoded_shape(self, h: wire.WireHeader) -> tuple[int, ...]:
        return (h.shape[0], h.shape[1], self.dim)

    def decode_tensor(self, z: torch.Tensor, meta: Mapping[str, Any], budget: int | None = None) -> torch.Tensor:
        n, t, _ = z.shape
        y = self.decoder["fc"](z).reshape(n * t, -1)  # (N*T, D)
        return self.decoder["bn"](y, budget).reshape(n, t, -1)  # (N, T, D)

    def check_received(self, h: wire.WireHeader) -> None:
        super().check_received(h)
        if h.meta:
            raise WireFormatError(f"tokens header meta must be empty, got {h.meta}")


def encode_activation(codec: Codec, x: torch.Tensor, budget: int | None = None,
                      wire_dtype: str = "fp16") -> tuple[dict[str, Any], list[memoryview]]:
    """``codec.encode``, as a function for callers that keep codecs in a table."""
    return codec.encode(x, budget=budget, wire_dtype=wire_dtype)


def decode_activation(codec: Codec, header: Any, frames: Sequence[Any],
                      limits: WireLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """``codec.decode``, as a function for callers that keep codecs in a table."""
    return codec.decode(header, frames, limits)
