"""Compression-aware split training: the deprune/prune schedules of Mudvari et al. with byte accounting.

Training is split learning as in amudvari/VCCprune (``utils.train``/``utils.prune``): the
client half (model + encoder + filter p) and the server half (decoder + model) have their
own optimizers; the client's output crosses the simulated link detached (masked and cast
to the wire dtype), the server's input is a leaf, and the gradient that comes back is
masked the same way before ``client_out.backward(g)``.

- Uncompressed phases: all channels, fp32 both ways, p frozen (the reference's
  ``prune=False`` sets ``requires_grad=False`` on the filter).
- Compressed phases at budget b: the top-b channels by sigmoid(p)^2, each times its
  weight; fp16 both ways by default; loss CE + 2·eps·cosh(delta·(Σ sigmoid(p)^2 − b)).

Schedules (``schedule_phases``):

- ``deprune``: b = 4 for most epochs, ``reset_deprune``, then uncompressed;
- ``prune``: uncompressed, then b = 32, then b = 4 (transfer learning);
- ``none`` / ``fixed``: the baselines (uncompressed; one budget from scratch).

Every epoch records the held-out accuracy and the bytes that crossed the link: the
activation and gradient frames (kept channels × positions × bytes per element, plus int8
scales) and, unless disabled, their msgpack headers.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import wire
from .codecs import FilteredCodec
from .data import Dataset
from .errors import CodecError
from .evaluation import evaluate
from .filters import DELTA, EPSILON, budget_penalty, filter_weights, reset_deprune
from .splitnets import SplitNet

SCHEDULES = ("deprune", "prune", "none", "fixed")
_PHASE = re.compile(r"(full|mix|b(\d+))(?:/(fp32|fp16|int8))?:(\d+)")
MIX = "mix"  # Phase.budget value: a budget drawn per batch from the codec's budgets and full width


@dataclass(frozen=True)
class Phase:
    """A run of epochs at one budget."""

    epochs: int
    budget: int | str | None = None  # None = uncompressed (all channels, no mask); MIX = per batch
    wire_dtype: str | None = None  # None: fp16 when compressed, fp32 when not (the reference)
    reset: bool = False  # apply reset_deprune to the filter before this phase

    @property
    def dtype(self) -> str:
        return self.wire_dtype or ("fp32" if self.budget is None else "fp16")

    @property
    def label(self) -> str:
        name = "full" if self.budget is None else self.budget if self.budget == MIX else f"b{self.budget}"
        return f"{name}/{self.dtype}"

    @property
    def trains_filter(self) -> bool:
        """Only fixed-budget phases move p (the penalty needs a target; mixing needs a fixed ranking)."""
        return isinstance(self.budget, int)


def parse_phases(spec: str) -> list[Phase]:
    """Phases from a spec such as ``"b4:15,reset,full:7"`` or ``"full:30,b32:10,b4/int8:10"``.

    Args:
        spec: comma-separated items: ``full:E``, ``bB:E`` or ``bB/DTYPE:E`` (E epochs at budget B,
            DTYPE one of fp32/fp16/int8), ``mix:E`` (each batch at a budget drawn from the codec's
            budgets and full width, filter frozen: teaches one module every budget), and
            ``reset`` (reset the filter before the next item).
    Returns:
        The phases.
    """
    phases: list[Phase] = []
    reset = False
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "reset":
            reset = True
            continue
        m = _PHASE.fullmatch(item)
        if not m:
            raise CodecError(f"bad phase {item!r} in {spec!r}: use full:E, bB:E, bB/DTYPE:E or reset")
        budget = None if m.group(1) == "full" else MIX if m.group(1) == MIX else int(m.group(2))
        phases.append(Phase(int(m.group(4)), budget, m.group(3), reset))
        reset = False
    if not phases or reset:
        raise CodecError(f"phase spec {spec!r} must hold at least one phase and may not end with reset")
    return phases


def schedule_phases(schedule: str, epochs: int, *, budget: int = 4, mid_budget: int = 32,
                    compressed_share: float = 0.68, full_epochs: int | None = None,
                    wire_dtype: str | None = None) -> list[Phase]:
    """The named schedules as phases.

    Args:
        schedule: "deprune", "prune", "none" or "fixed".
        epochs: total epochs (for "prune": epochs of the compressed part, split evenly
            between ``mid_budget`` and ``budget``).
        budget: the high-compression budget (4 in the paper).
        mid_budget: prune's intermediate budget (32 in the paper).
        compressed_share: deprune's share of epochs at ``budget`` (15 of 22 in the paper).
        full_epochs: prune's uncompressed epochs first (default ``epochs``; 0 when starting
            from an already trained uncompressed model).
        wire_dtype: dtype of the compressed phases (default fp16).
    Returns:
        The phases.
    """
    if epochs < 1:
        raise CodecError(f"epochs must be >= 1, got {epochs}")
    if schedule == "none":
        return [Phase(epochs)]
    if schedule == "fixed":
        return [Phase(epochs, budget, wire_dtype)]
    if schedule == "deprune":
        n_c = min(epochs - 1, max(1, round(epochs * compressed_share)))
        if n_c < 1:
            raise CodecError(f"deprune needs at least 2 epochs, got {epochs}")
        return [Phase(n_c, budget, wire_dtype), Phase(epochs - n_c, None, None, reset=True)]
    if schedule == "prune":
        n_full = epochs if full_epochs is None else full_epochs
        n_mid = math.ceil(epochs / 2)
        phases = [Phase(n_full)] if n_full > 0 else []
        phases.append(Phase(n_mid, mid_budget, wire_dtype))
        if epochs - n_mid > 0:
            phases.append(Phase(epochs - n_mid, budget, wire_dtype))
        return phases
    raise CodecError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters (defaults: the reference's deprune runs on CIFAR10)."""

    lr: float = 1e-2
    momentum: float = 0.0  # 0 for deprune, 0.9 for prune in the reference
    weight_decay: float = 5e-4
    optimizer: str = "sgd"  # "sgd" (reference) or "adamw" (for ViTs trained from scratch)
    batch_size: int = 16
    eval_batch_size: int = 256
    eps: float = EPSILON
    delta: float = DELTA
    seed: int = 56  # shuffling, augmentation and filter resets
    shift_px: int = 0  # random-crop augmentation: pad by this many pixels, crop back (0 = off)
    lr_schedule: str = "constant"  # "constant" (reference) or "cosine" (decay to 0 over the run)
    count_headers: bool = True  # add msgpack header bytes to the training traffic
    progress: bool = True  # tqdm bar over epochs


@dataclass
class EpochRecord:
    """One epoch's outcome."""

    epoch: int  # 1-based over the whole run
    phase: int  # index into the phases
    label: str  # e.g. "b4/fp16" or "full/fp32"
    budget: int | None
    train_ce: float  # mean cross-entropy over the epoch
    penalty: float  # mean budget penalty (0 in uncompressed phases)
    test_acc: float  # held-out accuracy at this phase's budget and dtype (mix: smallest budget), percent
    act_bytes: int  # activation bytes sent this epoch (client -> server)
    grad_bytes: int  # gradient bytes sent this epoch (server -> client)
    cum_bytes: int  # all bytes sent since the start of the run
    weight_sum: float  # sum_c sigmoid(p_c)^2 at the end of the epoch
    seconds: float
    extra_acc: dict[str, float] = field(default_factory=dict)  # accuracy at other operating points


def _make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise CodecError(f"unknown optimizer {cfg.optimizer!r}; use 'sgd' or 'adamw'")


class SplitTrainer:
    """Runs phases on a split model, keeping the optimizers and byte counts across phases."""

    def __init__(self, net: SplitNet, data: Dataset, config: TrainConfig = TrainConfig()) -> None:
        self.net, self.data, self.cfg = net, data, config
        self.gen = torch.Generator().manual_seed(config.seed)
        self.opt_client = _make_optimizer(net.client_parameters(), config)
        self.opt_server = _make_optimizer(net.server_parameters(), config)
        self.history: list[EpochRecord] = []
        self.cum_bytes = 0
        self._background = float(data.x_train.min())  # value of an empty pixel, for padding

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """Random crop after padding with the background value (RandomCrop(size, padding) of the reference)."""
        s = self.cfg.shift_px
        if s <= 0 or x.dim() != 4:
            return x
        n, _, h, w = x.shape
        padded = F.pad(x, (s, s, s, s), value=self._background)  # (N, C, H+2s, W+2s)
        dy = torch.randint(0, 2 * s + 1, (n,), generator=self.gen).tolist()
        dx = torch.randint(0, 2 * s + 1, (n,), generator=self.gen).tolist()
        return torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx))])

    def _set_lr(self, done_steps: int, total_steps: int) -> None:
        if self.cfg.lr_schedule == "constant":
            return
        if self.cfg.lr_schedule != "cosine":
            raise CodecError(f"unknown lr schedule {self.cfg.lr_schedule!r}; use 'constant' or 'cosine'")
        lr = 0.5 * self.cfg.lr * (1 + math.cos(math.pi * min(1.0, done_steps / max(1, total_steps))))
        for opt in (self.opt_client, self.opt_server):
            for group in opt.param_groups:
                group["lr"] = lr

    # --- one training step ------------------------------------------------------------------
    def _step(self, x: torch.Tensor, y: torch.Tensor, budget: int | None, dtype: str,
              penalize: bool) -> tuple[float, float, int, int]:
        net, codec, cfg = self.net, self.net.codec, self.cfg
        h = net.client(x)
        z = codec.encode_tensor(h)  # client output at full width, e.g. (N, C', H', W')
        axis = codec.axis
        kept, m = codec.mask(budget)
        view = [-1 if d == axis else 1 for d in range(z.dim())]
        with torch.no_grad():  # the link: mask, cast, (only kept channels travel)
            zm = z.detach() if m is None else z.detach() * m.reshape(view)
            leaf = wire.simulate(zm, wire_dtype=dtype, axis=axis, kept=kept)
        leaf.requires_grad_(True)
        logits = net.server(codec.decode_tensor(leaf, codec.link_meta(h), budget))
        ce = F.cross_entropy(logits, y)
        self.opt_client.zero_grad(set_to_none=True)
        self.opt_server.zero_grad(set_to_none=True)
        ce.backward()
        grad_dtype = "fp32" if dtype == "fp32" else "fp16"  # gradients are not sent as int8
        with torch.no_grad():  # the way back: the same mask, the same kept channels
            g = leaf.grad if m is None else leaf.grad * m.reshape(view)
            g = wire.simulate(g, wire_dtype=grad_dtype, axis=axis, kept=kept)
        pen_value = 0.0
        if penalize and budget is not None:
            pen = budget_penalty(codec.filter_logits, budget, cfg.eps, cfg.delta)
            torch.autograd.backward([z, pen], [g, None])
            pen_value = float(pen.detach())
        else:
            z.backward(g)
        self.opt_server.step()
        self.opt_client.step()
        n_kept = None if kept is None else kept.numel()
        act = wire.payload_nbytes(z.shape, axis, n_kept, dtype)
        grad = wire.payload_nbytes(z.shape, axis, n_kept, grad_dtype)
        if cfg.count_headers:
            hdr = wire.header_nbytes(wire.make_header(codec=codec.kind, wire_dtype=dtype, shape=z.shape,
                                                      axis=axis, kept=kept, meta=codec.link_meta(h)))
            act, grad = act + hdr, grad + hdr
        return float(ce.detach()), pen_value, act, grad

    # --- phases ---------------------------------------------------------------------------------
    def run(self, phases: Sequence[Phase], eval_points: Sequence[tuple[int | None, str]] = (),
            on_epoch: Callable[[EpochRecord], None] | None = None, desc: str = "train") -> list[EpochRecord]:
        """Train through ``phases``; returns (and appends to ``history``) one record per epoch.

        Args:
            phases: what to run.
            eval_points: extra (budget, dtype) pairs to evaluate after every epoch.
            on_epoch: called with each record.
            desc: progress bar label.
        Returns:
            The new records.
        """
        codec = self.net.codec
        if not isinstance(codec, FilteredCodec) and any(p.budget is not None or p.reset for p in phases):
            raise CodecError(f"codec {codec.kind!r} has no filter: only uncompressed phases can train it")
        for p in phases:
            if isinstance(p.budget, int) and p.budget not in codec.budgets:
                raise CodecError(f"budget {p.budget} is not offered by the codec (budgets {codec.budgets})")
            wire.check_wire_dtype(p.dtype)
        new: list[EpochRecord] = []
        total = sum(p.epochs for p in phases)
        bar = tqdm(total=total, desc=desc, unit="epoch", disable=not self.cfg.progress, leave=False)
        x, y = self.data.x_train, self.data.y_train
        bs = min(self.cfg.batch_size, len(y))
        steps_per_epoch = len(y) // bs
        total_steps, done_steps = total * steps_per_epoch, 0
        for pi, phase in enumerate(phases):
            if isinstance(codec, FilteredCodec):
                if phase.reset:
                    reset_deprune(codec.filter_logits, generator=self.gen)
                codec.filter_logits.requires_grad_(phase.trains_filter)
            choices = [None, *codec.budgets]  # for mix phases
            for _ in range(phase.epochs):
                t0 = time.perf_counter()
                self.net.train()
                order = torch.randperm(len(y), generator=self.gen)
                ce_sum = pen_sum = 0.0
                act = grad = steps = 0
                # drop the last partial batch: a 3-sample batch shifts BN's running statistics enough
                # to cost tens of points of held-out accuracy (seen on digits: 1347 = 84 * 16 + 3)
                for i in range(0, steps_per_epoch * bs, bs):
                    idx = order[i:i + bs]
                    self._set_lr(done_steps, total_steps)
                    done_steps += 1
                    budget, dtype = phase.budget, phase.dtype
                    if budget == MIX:
                        budget = choices[int(torch.randint(len(choices), (1,), generator=self.gen))]
                        dtype = phase.wire_dtype or ("fp32" if budget is None else "fp16")
                    ce, pen, a, g = self._step(self._augment(x[idx]), y[idx], budget, dtype, phase.trains_filter)
                    ce_sum, pen_sum, act, grad, steps = ce_sum + ce, pen_sum + pen, act + a, grad + g, steps + 1
                self.cum_bytes += act + grad
                eval_budget = min(codec.budgets) if phase.budget == MIX else phase.budget
                acc = evaluate(self.net, self.data.x_test, self.data.y_test, eval_budget, phase.dtype,
                               self.cfg.eval_batch_size)
                extra = {f"{'full' if b is None else f'b{b}'}/{d}":
                         evaluate(self.net, self.data.x_test, self.data.y_test, b, d, self.cfg.eval_batch_size)
                         for b, d in eval_points}
                wsum = float(filter_weights(codec.filter_logits.detach()).sum()) if isinstance(codec, FilteredCodec) else 0.0
                rec = EpochRecord(len(self.history) + 1, pi, phase.label, phase.budget, ce_sum / steps,
                                  pen_sum / steps, acc, act, grad, self.cum_bytes, wsum,
                                  time.perf_counter() - t0, extra)
                self.history.append(rec)
                new.append(rec)
                bar.update(1)
                bar.set_postfix(phase=phase.label, acc=f"{acc:.1f}", MB=f"{self.cum_bytes / 1e6:.2f}")
                if on_epoch is not None:
                    on_epoch(rec)
        bar.close()
        return new


def history_to_json(records: Sequence[EpochRecord]) -> list[dict[str, Any]]:
    """Records as JSON-safe dicts."""
    return [asdict(r) for r in records]
