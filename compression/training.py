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

- ``deprune``: b = 4 for most epochs, ``reset_deprune``, then uncompressed (optionally, with
  ``widen_at_reset``, the decoder first gets zero weights on the channels b = 4 never sent,
  so the widened model starts as the b = 4 model instead of with untrained inputs as noise);
- ``prune``: uncompressed, then b = 32, then b = 4 (transfer learning);
- ``none`` / ``fixed``: the baselines (uncompressed; one budget from scratch).

Phases may last a fraction of an epoch (``b32:0.25``). Every evaluation point (each
1/``evals_per_epoch`` of an epoch of data, and the end of every phase) records the held-out
accuracy and the bytes that crossed the link since the previous point: the activation and
gradient frames (kept channels × positions × bytes per element, plus int8 scales) and, unless
disabled, their msgpack headers.
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
from .budget_norm import BudgetNorm
from .filters import DELTA, EPSILON, budget_penalty, filter_weights, kept_channels, reset_deprune
from .splitnets import SplitNet

SCHEDULES = ("deprune", "prune", "none", "fixed")
_PHASE = re.compile(r"(full|mix|b(\d+))(?:/(fp32|fp16|int8))?:(\d+(?:\.\d+)?|\.\d+)(?:@(\d[\d.]*(?:e-?\d+)?))?")
MIX = "mix"  # Phase.budget value: a budget drawn per batch from the codec's budgets and full width


@dataclass(frozen=True)
class Phase:
    """A run of epochs (possibly a fraction of one) at one budget."""

    epochs: float  # epochs of data; fractions are rounded to whole steps (at least one)
    budget: int | str | None = None  # None = uncompressed (all channels, no mask); MIX = per batch
    wire_dtype: str | None = None  # None: fp16 when compressed, fp32 when not (the reference)
    reset: bool = False  # apply reset_deprune to the filter before this phase
    lr: float | None = None  # this phase's learning rate (the schedule's peak), None: TrainConfig.lr

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
        spec: comma-separated items: ``full:E``, ``bB:E`` or ``bB/DTYPE:E`` (E epochs at budget B, E may
            be a fraction such as ``0.25``,
            DTYPE one of fp32/fp16/int8), ``mix:E`` (each batch at a budget drawn from the codec's
            budgets and full width, filter frozen: teaches one module every budget), and
            ``reset`` (reset the filter before the next item); ``@LR`` after an item sets that
            phase's learning rate (``full:2@1e-4``).
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
        epochs = float(m.group(4))
        if epochs <= 0:
            raise CodecError(f"phase {item!r} in {spec!r} must last more than 0 epochs")
        lr = float(m.group(5)) if m.group(5) else None
        phases.append(Phase(_tidy(epochs), budget, m.group(3), reset, lr))
        reset = False
    if not phases or reset:
        raise CodecError(f"phase spec {spec!r} must hold at least one phase and may not end with reset")
    return phases


def schedule_phases(schedule: str, epochs: float, *, budget: int = 4, mid_budget: int = 32,
                    compressed_share: float = 0.68, full_epochs: float | None = None,
                    mid_epochs: float | None = None, wire_dtype: str | None = None,
                    full_lr: float | None = None) -> list[Phase]:
    """The named schedules as phases.

    Args:
        schedule: "deprune", "prune", "none" or "fixed".
        epochs: total epochs (for "prune": epochs of the compressed part, split evenly
            between ``mid_budget`` and ``budget`` unless ``mid_epochs`` is given).
        budget: the high-compression budget (4 in the paper).
        mid_budget: prune's intermediate budget (32 in the paper).
        compressed_share: deprune's share of epochs at ``budget`` (15 of 22 in the paper),
            rounded to whole epochs; used when ``full_epochs`` is not given.
        full_epochs: prune: the uncompressed epochs first (default ``epochs``; 0 when starting
            from an already trained uncompressed model); deprune: the uncompressed epochs after
            the reset (default: what ``compressed_share`` leaves), may be a fraction.
        mid_epochs: prune: epochs at ``mid_budget`` (default half of ``epochs``, rounded up), may
            be a fraction; the rest of ``epochs`` runs at ``budget``.
        wire_dtype: dtype of the compressed phases (default fp16).
        full_lr: deprune: learning rate of the uncompressed finish (default: the run's).
    Returns:
        The phases.
    """
    if epochs <= 0:
        raise CodecError(f"epochs must be > 0, got {epochs}")
    if schedule == "none":
        return [Phase(epochs)]
    if schedule == "fixed":
        return [Phase(epochs, budget, wire_dtype)]
    if schedule == "deprune":
        if full_epochs is not None:
            if not 0 < full_epochs < epochs:
                raise CodecError(f"deprune's uncompressed finish must be in (0, {epochs}) epochs, got {full_epochs}")
            return [Phase(_tidy(epochs - full_epochs), budget, wire_dtype),
                    Phase(full_epochs, None, None, reset=True, lr=full_lr)]
        n_c = min(epochs - 1, max(1, round(epochs * compressed_share)))
        if n_c < 1:
            raise CodecError(f"deprune needs at least 2 epochs, got {epochs}")
        return [Phase(n_c, budget, wire_dtype), Phase(_tidy(epochs - n_c), None, None, reset=True, lr=full_lr)]
    if schedule == "prune":
        n_full = epochs if full_epochs is None else full_epochs
        n_mid = math.ceil(epochs / 2) if mid_epochs is None else mid_epochs
        if not 0 < n_mid <= epochs:
            raise CodecError(f"prune's b={mid_budget} phase must be in (0, {epochs}] epochs, got {n_mid}")
        phases = [Phase(n_full)] if n_full > 0 else []
        phases.append(Phase(n_mid, mid_budget, wire_dtype))
        if epochs - n_mid > 0:
            phases.append(Phase(_tidy(epochs - n_mid), budget, wire_dtype))
        return phases
    raise CodecError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")


def _tidy(epochs: float) -> float:
    """Epoch counts without float noise (9.75 - 0.5, not 9.250000000000002); ints stay ints."""
    r = round(epochs, 9)
    return int(r) if float(r).is_integer() else r


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
    lr_schedule: str = "constant"  # "constant" (reference), "cosine" (decay to 0 over the run) or
    # "cosine_phase" (each phase decays from lr to 0 over its own steps: one-phase runs as "cosine")
    count_headers: bool = True  # add msgpack header bytes to the training traffic
    evals_per_epoch: int = 1  # evaluation points per epoch of data (phase ends are evaluation points too)
    # at a filter reset that follows a compressed phase: zero the decoder's weights on the channels that
    # phase never sent and start full width's BN statistics from that budget's, so widening the link
    # keeps the model's function (function-preserving widening; not in the paper, off = the reference)
    widen_at_reset: bool = False
    progress: bool = True  # tqdm bar over steps


@dataclass
class EpochRecord:
    """The outcome of the steps since the previous evaluation point (one epoch unless
    ``evals_per_epoch`` > 1 or a phase ends mid-epoch)."""

    epoch: float  # epochs of data trained at this point, over the trainer's whole history (1, 2, ... or 0.25, 0.5, ...)
    phase: int  # index into the phases
    label: str  # e.g. "b4/fp16" or "full/fp32"
    budget: int | None
    train_ce: float  # mean cross-entropy over the record's steps
    penalty: float  # mean budget penalty (0 in uncompressed phases)
    test_acc: float  # held-out accuracy at this phase's budget and dtype (mix: smallest budget), percent
    act_bytes: int  # activation bytes sent in the record's steps (client -> server)
    grad_bytes: int  # gradient bytes sent in the record's steps (server -> client)
    cum_bytes: int  # all bytes sent since the start of the run
    weight_sum: float  # sum_c sigmoid(p_c)^2 at this point
    seconds: float  # training time of the record's steps (evaluation excluded)
    extra_acc: dict[str, float] = field(default_factory=dict)  # accuracy at other operating points
    steps: int = 0  # training steps at this point, over the trainer's whole history


@torch.no_grad()
def widen_decoder(codec: FilteredCodec, budget: int) -> int:
    """Make the decoder at full width compute what it computed at ``budget`` (call before a filter reset).

    The decoder's first layer gets zero weights on every channel outside the ones kept at
    ``budget`` (training at that budget never sent them, so those weights are untrained), and
    its ``BudgetNorm`` layers' full-width statistics become those of ``budget``. The channels
    then join through training instead of as noise. Returns the number of silenced channels.
    """
    kept = kept_channels(codec.filter_logits, budget)
    silent = torch.ones(codec.width, dtype=torch.bool)
    silent[kept] = False
    first = next((m for m in codec.decoder.modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d))), None)
    if first is None:
        raise CodecError(f"codec {codec.kind!r}: no linear or conv layer in the decoder to widen")
    in_dim = 0 if isinstance(first, torch.nn.ConvTranspose2d) else 1  # weight (in, out, ...) vs (out, in, ...)
    if first.weight.shape[in_dim] != codec.width:
        raise CodecError(f"codec {codec.kind!r}: the decoder's first layer reads {first.weight.shape[in_dim]} "
                         f"channels, the link has {codec.width}")
    first.weight.index_fill_(in_dim, torch.nonzero(silent).reshape(-1).to(first.weight.device), 0.0)
    for m in codec.decoder.modules():
        if isinstance(m, BudgetNorm):
            m.running_mean[0].copy_(m.running_mean[m.row(budget)])
            m.running_var[0].copy_(m.running_var[m.row(budget)])
    return int(silent.sum())


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
        self.steps_done = 0  # training steps over the whole history
        self._order: torch.Tensor | None = None  # the current epoch's permutation of the training set
        self._pos = 0  # next index into it
        self._last_budget: int | str | None = None  # budget of the phase run last
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

    def _set_lr(self, done_steps: int, total_steps: int, base: float | None = None) -> None:
        base = self.cfg.lr if base is None else base
        if self.cfg.lr_schedule == "constant":
            lr = base
        elif self.cfg.lr_schedule in ("cosine", "cosine_phase"):
            lr = 0.5 * base * (1 + math.cos(math.pi * min(1.0, done_steps / max(1, total_steps))))
        else:
            raise CodecError(f"unknown lr schedule {self.cfg.lr_schedule!r}; use 'constant', 'cosine' or 'cosine_phase'")
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
    def _next_batch(self, bs: int, steps_per_epoch: int) -> torch.Tensor:
        """Indices of the next batch: a fresh permutation per epoch of data, carried across phases."""
        if self._order is None or self._pos >= steps_per_epoch * bs:
            self._order, self._pos = torch.randperm(len(self.data.y_train), generator=self.gen), 0
        idx = self._order[self._pos:self._pos + bs]
        self._pos += bs
        return idx

    def _record(self, pi: int, phase: Phase, acc_state: list, eval_points: Sequence[tuple[int | None, str]],
                steps_per_epoch: int) -> EpochRecord:
        codec = self.net.codec
        ce_sum, pen_sum, act, grad, steps, seconds = acc_state
        self.cum_bytes += act + grad
        eval_budget = min(codec.budgets) if phase.budget == MIX else phase.budget
        acc = evaluate(self.net, self.data.x_test, self.data.y_test, eval_budget, phase.dtype,
                       self.cfg.eval_batch_size)
        extra = {f"{'full' if b is None else f'b{b}'}/{d}":
                 evaluate(self.net, self.data.x_test, self.data.y_test, b, d, self.cfg.eval_batch_size)
                 for b, d in eval_points}
        wsum = float(filter_weights(codec.filter_logits.detach()).sum()) if isinstance(codec, FilteredCodec) else 0.0
        epoch = self.steps_done / steps_per_epoch
        return EpochRecord(int(epoch) if epoch.is_integer() else round(epoch, 6), pi, phase.label, phase.budget,
                           ce_sum / steps, pen_sum / steps, acc, act, grad, self.cum_bytes, wsum, seconds, extra,
                           self.steps_done)

    def run(self, phases: Sequence[Phase], eval_points: Sequence[tuple[int | None, str]] = (),
            on_epoch: Callable[[EpochRecord], None] | None = None, desc: str = "train") -> list[EpochRecord]:
        """Train through ``phases``; returns (and appends to ``history``) one record per evaluation point.

        Evaluation points are every 1/``evals_per_epoch`` of an epoch of data (counted over the
        trainer's whole history) and the end of every phase.

        Args:
            phases: what to run.
            eval_points: extra (budget, dtype) pairs to evaluate at every evaluation point.
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
            if not p.epochs > 0:
                raise CodecError(f"a phase must last more than 0 epochs, got {p.epochs}")
            wire.check_wire_dtype(p.dtype)
        if self.cfg.evals_per_epoch < 1:
            raise CodecError(f"evals_per_epoch must be >= 1, got {self.cfg.evals_per_epoch}")
        new: list[EpochRecord] = []
        x, y = self.data.x_train, self.data.y_train
        bs = min(self.cfg.batch_size, len(y))
        # drop the last partial batch of each epoch: a 3-sample batch shifts BN's running statistics
        # enough to cost tens of points of held-out accuracy (seen on digits: 1347 = 84 * 16 + 3)
        steps_per_epoch = len(y) // bs
        n = self.cfg.evals_per_epoch
        marks = {round(k * steps_per_epoch / n) % steps_per_epoch for k in range(1, n + 1)}  # step offsets in an epoch
        phase_steps = [max(1, round(p.epochs * steps_per_epoch)) for p in phases]
        total_steps, done_steps = sum(phase_steps), 0
        bar = tqdm(total=total_steps, desc=desc, unit="step", disable=not self.cfg.progress, leave=False)
        for pi, (phase, n_steps) in enumerate(zip(phases, phase_steps)):
            if isinstance(codec, FilteredCodec):
                if phase.reset:
                    if self.cfg.widen_at_reset and isinstance(self._last_budget, int):
                        widen_decoder(codec, self._last_budget)
                    reset_deprune(codec.filter_logits, generator=self.gen)
                codec.filter_logits.requires_grad_(phase.trains_filter)
            self._last_budget = phase.budget
            choices = [None, *codec.budgets]  # for mix phases
            state = [0.0, 0.0, 0, 0, 0, 0.0]  # ce_sum, pen_sum, act, grad, steps, seconds since the last record
            self.net.train()
            t0 = time.perf_counter()
            for i in range(n_steps):
                idx = self._next_batch(bs, steps_per_epoch)
                if self.cfg.lr_schedule == "cosine_phase":
                    self._set_lr(i, n_steps, phase.lr)
                else:
                    self._set_lr(done_steps, total_steps, phase.lr)
                done_steps += 1
                budget, dtype = phase.budget, phase.dtype
                if budget == MIX:
                    budget = choices[int(torch.randint(len(choices), (1,), generator=self.gen))]
                    dtype = phase.wire_dtype or ("fp32" if budget is None else "fp16")
                ce, pen, a, g = self._step(self._augment(x[idx]), y[idx], budget, dtype, phase.trains_filter)
                self.steps_done += 1
                state = [state[0] + ce, state[1] + pen, state[2] + a, state[3] + g, state[4] + 1, state[5]]
                bar.update(1)
                if self.steps_done % steps_per_epoch in marks or i == n_steps - 1:
                    state[5] = time.perf_counter() - t0
                    rec = self._record(pi, phase, state, eval_points, steps_per_epoch)
                    self.history.append(rec)
                    new.append(rec)
                    bar.set_postfix(phase=phase.label, acc=f"{rec.test_acc:.1f}", MB=f"{self.cum_bytes / 1e6:.2f}")
                    if on_epoch is not None:
                        on_epoch(rec)
                    state = [0.0, 0.0, 0, 0, 0, 0.0]
                    self.net.train()
                    t0 = time.perf_counter()
        bar.close()
        return new


def history_to_json(records: Sequence[EpochRecord]) -> list[dict[str, Any]]:
    """Records as JSON-safe dicts."""
    return [asdict(r) for r in records]
