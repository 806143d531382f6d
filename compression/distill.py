"""Label-free codec training at a cut of a partitioned model: the model teaches its own codec.

A user's model is already trained and partitioned into a block store; what it lacks is a
codec for the link at block ``cut`` (blocks ``[0, cut)`` send, ``[cut, n)`` receive). The
model is rebuilt from its blocks and frozen; the codec sits between its two halves and is
trained so that the model's output *with* the codec matches its output without it:

    loss = T^2 * KL(softmax(teacher / T) || softmax(student / T))
           + mse_weight * mean(((decoded - activation) / std_c)^2)

so no labels are needed, only inputs like the ones the model will see (a folder of images,
or digits).

- **Start from PCA** (``pca_init``): the encoder projects on the activation's principal
  components (largest first), the filter ranks them in that order, and the decoder maps them
  back, so before any training full width is (almost) the identity and budget b sends the top
  b components: the best linear nested code. Measured on the digits ViT (benchmarks/codec_user.py):
  from the default random initialisation, 8 epochs ended with the decoded activation as far
  from the true one as its mean is (normalised MSE 0.95) and 97-98 % agreement at every budget,
  full width included.
- **Nested budgets, one codec**: every batch crosses the simulated link at one budget drawn
  from the codec's budgets and full width, small budgets drawn more often (the 'mix' phase of
  ``training``, weighted); the filter is frozen, so the kept channels at b are a subset of those
  at 2b and one codec serves every budget.
- **Batch norm as a fixed map**: the codec's batch-norm statistics are set from data before
  training (by ``pca_init``, or by ``calibrate_norms`` for codecs it cannot initialise) and
  frozen; training moves the weights around them, so training and inference compute the same
  function (with batch statistics, a budget's output during training is rescaled to full
  variance by its own batch, and the stored statistics are of another function).

Usage::

    cm = load_cut_model(store, store.manifest("vit"), cut=6)
    data = digits_images(cm.manifest.input_shape)              # or folder_images(path, ...)
    codec = create_cut_codec(cm.manifest, 6)
    distill_codec(codec, cm, data.x_train, DistillConfig(epochs=4))
    base, points = evaluate_cut(codec, cm, data.x_test, data.y_test, [8, 16, 32, None], ["int8"])
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from edgesplit.partitioner import BlockStore, ModelManifest, build_blocks

from .budget_norm import BudgetNorm
from .codecs import MIN_BUDGET, FeatureMapCodec, FilteredCodec, TokenCodec, create_codec
from .errors import CodecError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm's IMAGENET_DEFAULT_MEAN, the fallback without a data config
IMAGENET_STD = (0.229, 0.224, 0.225)
PLANNER_WIRE_DTYPE = "fp16"  # what the runtime sends on a codec link whose plan names no dtype (links.py)


# --- inputs -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CutImages:
    """Inputs for a codec at a cut: training images, held-out images, and labels when there are any."""

    x_train: torch.Tensor  # (N, C, H, W) float32, preprocessed as the model expects
    x_test: torch.Tensor
    y_test: torch.Tensor | None  # held-out labels (digits), None for an unlabelled folder
    y_train: torch.Tensor | None = None
    source: str = ""


def digits_images(input_shape: Sequence[int], split_seed: int = 0, test_fraction: float = 0.25) -> CutImages:
    """scikit-learn's digits at the model's input size, grey repeated over its channels.

    Standardised with training statistics as ``data.load_digits_split`` does, so a model trained
    on that split sees the same inputs here.
    """
    from .data import load_digits_split

    c, h, w = _chw(input_shape)
    d = load_digits_split(image_px=h, test_fraction=test_fraction, split_seed=split_seed)
    xs = []
    for x in (d.x_train, d.x_test):
        if w != h:
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        xs.append(x.expand(-1, c, -1, -1).contiguous())  # (N, 1, H, W) -> (N, C, H, W)
    return CutImages(xs[0], xs[1], d.y_test, d.y_train, f"digits (split seed {split_seed})")


def folder_images(path: str | Path, input_shape: Sequence[int], data_config: Mapping[str, Any] | None = None,
                  test_fraction: float = 0.1, seed: int = 0, limit: int = 0) -> CutImages:
    """Every image file under ``path`` (recursively), preprocessed for the model, a seeded share held out.

    Args:
        path: a directory of images (png, jpg, ...); labels are not needed.
        input_shape: the model's per-sample input ``[C, H, W]``.
        data_config: timm's data config (``input_size``, ``interpolation``, ``mean``, ``std``,
            ``crop_pct``); None: resize to ``H x W`` and normalise with ImageNet statistics.
        test_fraction: share of the images held out to measure agreement.
        seed: which images are held out.
        limit: use at most this many images (0 = all).
    Returns:
        The images, with ``y_test`` None.
    """
    try:
        from PIL import Image
    except ImportError:
        raise CodecError("reading an image folder needs Pillow: pip install 'edgesplit[images]'") from None
    root = Path(path)
    if not root.is_dir():
        raise CodecError(f"--images {root}: not a directory (give a folder of images, or 'digits')")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if limit > 0:
        files = files[:limit]
    if len(files) < 2:
        raise CodecError(f"--images {root}: found {len(files)} image files ({', '.join(IMAGE_SUFFIXES)}); "
                         "need at least 2 (one to train on, one to hold out)")
    c, h, w = _chw(input_shape)
    cfg = dict(data_config or {})
    mean = torch.tensor(cfg.get("mean", IMAGENET_MEAN)[:c] if c in (1, 3) else [0.5] * c).view(-1, 1, 1)
    std = torch.tensor(cfg.get("std", IMAGENET_STD)[:c] if c in (1, 3) else [0.5] * c).view(-1, 1, 1)
    crop = float(cfg.get("crop_pct") or 1.0)
    resample = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                "lanczos": Image.LANCZOS}.get(str(cfg.get("interpolation", "bilinear")), Image.BILINEAR)
    xs = []
    for f in files:
        try:
            with Image.open(f) as img:
                img = img.convert("L" if c == 1 else "RGB")
                # timm's eval transform: resize to size / crop_pct, centre crop to size
                sh, sw = math.floor(h / crop), math.floor(w / crop)
                img = img.resize((sw, sh), resample)
                top, left = (sh - h) // 2, (sw - w) // 2
                img = img.crop((left, top, left + w, top + h))
                x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float() / 255.0
        except OSError as e:
            raise CodecError(f"cannot read image {f}: {e}") from None
        x = x.reshape(h, w, -1).permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
        if x.shape[0] != c:
            x = x[:1].expand(c, -1, -1)
        xs.append((x - mean) / std)
    x_all = torch.stack(xs)  # (N, C, H, W)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))
    n_test = min(len(files) - 1, max(1, round(test_fraction * len(files))))
    te, tr = order[:n_test], order[n_test:]
    return CutImages(x_all[tr].contiguous(), x_all[te].contiguous(), None, None, f"{len(files)} images in {root}")


def load_cut_images(source: str, manifest: ModelManifest, seed: int = 0, limit: int = 0) -> CutImages:
    """``"digits"`` or a directory, preprocessed by the manifest's ``extra["data_config"]`` when it has one."""
    if source == "digits":
        return digits_images(manifest.input_shape, split_seed=seed)
    return folder_images(source, manifest.input_shape, manifest.extra.get("data_config"), seed=seed, limit=limit)


def _chw(input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise CodecError(f"the model's input is {list(input_shape)}, not images [C, H, W]")
    return int(input_shape[0]), int(input_shape[1]), int(input_shape[2])


# --- the model and its codec --------------------------------------------------------------------

@dataclass
class CutModel:
    """A stored model in two halves at block ``cut``, frozen: ``head`` = blocks [0, cut), ``tail`` = [cut, n)."""

    manifest: ModelManifest
    cut: int
    head: nn.Module
    tail: nn.Module

    @property
    def shape(self) -> tuple[int, ...]:
        """The activation at the cut, per sample."""
        return cut_shape(self.manifest, self.cut)


def cut_shape(manifest: ModelManifest, cut: int) -> tuple[int, ...]:
    """Per-sample shape of what crosses cut ``cut`` (the output of block ``cut - 1``)."""
    if not 1 <= cut < manifest.n_blocks:
        raise CodecError(f"model {manifest.name} has {manifest.n_blocks} blocks, so a cut is a block index in "
                         f"1..{manifest.n_blocks - 1}; got {cut} (see `edgesplit inspect`)")
    return tuple(int(s) for s in manifest.blocks[cut - 1].out_shape)


def load_cut_model(store: BlockStore, manifest: ModelManifest, cut: int, device: str | torch.device = "cpu"
                   ) -> CutModel:
    """Rebuild both halves from the store's blocks (hashes checked), in eval mode, without gradients."""
    cut_shape(manifest, cut)
    head = build_blocks(store, manifest, 0, cut, device).requires_grad_(False).eval()
    tail = build_blocks(store, manifest, cut, manifest.n_blocks, device).requires_grad_(False).eval()
    return CutModel(manifest, cut, head, tail)


def codec_kind(shape: Sequence[int]) -> str:
    """``"tokens"`` for (T, D) activations (a ViT), ``"fmap"`` for (C, H, W) (a CNN)."""
    if len(shape) == 2:
        return "tokens"
    if len(shape) == 3:
        return "fmap"
    raise CodecError(f"no codec kind fits an activation of per-sample shape {list(shape)}: tokens need (T, D), "
                     "fmap needs (C, H, W)")


def create_cut_codec(manifest: ModelManifest, cut: int, kind: str | None = None, min_budget: int = MIN_BUDGET,
                     r: int = 1, seed: int = 0) -> FilteredCodec:
    """An untrained codec that fits the activation at ``cut`` (kind from its shape unless given).

    Args:
        r: fmap only: spatial reduction of the encoder (1 keeps H and W).
        seed: its initial weights and filter.
    """
    shape = cut_shape(manifest, cut)
    kind = kind or codec_kind(shape)
    if kind != codec_kind(shape):
        raise CodecError(f"a {kind!r} codec does not fit the activation at cut {cut} of {manifest.name}, "
                         f"per-sample shape {list(shape)}; use --kind {codec_kind(shape)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "tokens":
            codec = create_codec("tokens", dim=shape[1], min_budget=min_budget)
        else:
            codec = create_codec("fmap", channels=shape[0], r=r, min_budget=min_budget)
    assert isinstance(codec, FilteredCodec)
    return codec


# --- training ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistillConfig:
    """Hyperparameters of label-free codec training (defaults: what the digits ViT benchmark uses)."""

    epochs: float = 4.0  # passes over the training images (fractions allowed)
    lr: float = 2e-3  # AdamW peak; linear warm-up, then cosine to 0
    weight_decay: float = 1e-4
    batch_size: int = 64
    temperature: float = 2.0  # of the KL on logits (times T^2, so its gradients keep their scale)
    mse_weight: float = 0.1  # MSE on the decoded activation, per channel over its std: keeps the decoder honest
    wire_dtype: str = "int8"  # simulated on the link while training (straight-through); int8 also covers fp16
    budgets: tuple[int, ...] | None = None  # budgets to train (None: all the codec's)
    full_share: float = 0.1  # share of batches sent at full width
    small_bias: float = 0.5  # budget b is drawn with weight b^-small_bias: small budgets more often
    warmup_share: float = 0.05  # share of the steps warming the learning rate up
    init: str = "pca"  # "pca": start from the activation's principal components (when the codec allows);
    # "random": the codec's own initialisation (batch-norm statistics still set from data)
    init_samples: int = 512  # inputs whose activations set the initialisation
    cache_bytes: int = 1 << 30  # keep the activations at the cut in memory up to this size, else recompute
    seed: int = 0  # batch order and budget draws
    eval_batch_size: int = 128
    progress: bool = True  # tqdm bar on stderr


def budget_weights(budgets: Sequence[int], full_share: float, small_bias: float) -> list[tuple[int | None, float]]:
    """(budget, probability) of each batch's budget: ``full_share`` for full width, the rest by b^-small_bias."""
    if not 0 <= full_share <= 1:
        raise CodecError(f"full_share must be in [0, 1], got {full_share}")
    if not budgets:
        return [(None, 1.0)]
    raw = [b ** -small_bias for b in budgets]
    rest = (1.0 - full_share) / sum(raw)
    return [*((b, w * rest) for b, w in zip(budgets, raw)), (None, full_share)]


class _Activations:
    """The activation at the cut and the teacher's logits for a set of inputs, cached when they fit."""

    def __init__(self, cm: CutModel, x: torch.Tensor, cache_bytes: int, batch: int) -> None:
        self.cm, self.x, self.batch = cm, x, batch
        per = math.prod(cm.shape) * 4
        self.cached = per * len(x) <= cache_bytes
        self.h: torch.Tensor | None = None
        self.t: torch.Tensor | None = None
        if self.cached:
            hs, ts = [], []
            with torch.no_grad():  # not inference_mode: these tensors feed autograd later
                for i in range(0, len(x), batch):
                    h = cm.head(x[i:i + batch])
                    hs.append(h)
                    ts.append(cm.tail(h))
            self.h, self.t = torch.cat(hs), torch.cat(ts)

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.h is not None and self.t is not None:
            return self.h[idx], self.t[idx]
        with torch.no_grad():
            h = self.cm.head(self.x[idx])
            return h, self.cm.tail(h)

    def channel_std(self, axis: int, n: int = 512) -> torch.Tensor:
        """Per-channel std of the activation (from up to ``n`` samples), floored so dead channels do not explode."""
        h = self.get(torch.arange(min(n, len(self.x))))[0]
        dims = [d for d in range(h.dim()) if d != axis]
        std = h.std(dim=dims)
        return std.clamp_min(1e-3 * float(std.max()) + 1e-8)


def distill_codec(codec: FilteredCodec, cm: CutModel, x_train: torch.Tensor,
                  config: DistillConfig = DistillConfig()) -> list[dict[str, float]]:
    """Train ``codec`` at ``cm``'s cut so the frozen model's output with it matches its output without it.

    Args:
        codec: an untrained (or earlier) codec that fits the cut (``create_cut_codec``).
        cm: the model in two halves; never updated.
        x_train: inputs, preprocessed for the model (no labels).
        config: hyperparameters.
    Returns:
        One record per epoch: ``epoch``, ``loss``, ``kl``, ``mse``, ``seconds``. The codec ends in eval mode.
    """
    cfg = config
    budgets = tuple(codec.budgets) if cfg.budgets is None else tuple(cfg.budgets)
    bad = [b for b in budgets if b not in codec.budgets]
    if bad:
        raise CodecError(f"budgets {bad} are not offered by the codec (it serves {list(codec.budgets)})")
    if cfg.epochs <= 0 or cfg.batch_size < 1 or len(x_train) < 1:
        raise CodecError(f"need epochs > 0, batch_size >= 1 and some images; got {cfg.epochs}, {cfg.batch_size}, "
                         f"{len(x_train)} images")
    if cfg.init not in ("pca", "random"):
        raise CodecError(f"init must be 'pca' or 'random', got {cfg.init!r}")
    gen = torch.Generator().manual_seed(cfg.seed)
    acts = _Activations(cm, x_train, cfg.cache_bytes, cfg.eval_batch_size)
    axis = codec.axis
    inv_std = (1.0 / acts.channel_std(axis)).reshape([-1 if d == axis else 1 for d in range(len(cm.shape) + 1)])
    sample = acts.get(torch.randperm(len(x_train), generator=gen)[:cfg.init_samples])[0]
    every = [*codec.budgets, None]  # budgets not trained are still served: their statistics are set too
    if not (cfg.init == "pca" and pca_init(codec, sample, every)):
        calibrate_norms(codec, sample, every, cfg.wire_dtype, cfg.eval_batch_size)
    choices = budget_weights(budgets, cfg.full_share, cfg.small_bias)
    probs = torch.tensor([p for _, p in choices])
    codec.filter_logits.requires_grad_(False)  # frozen: a fixed ranking is what makes the budgets nested
    params = [p for p in codec.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    bs = min(cfg.batch_size, len(x_train))
    steps_per_epoch = len(x_train) // bs  # the last partial batch is dropped: every step sees bs inputs
    total = max(1, round(cfg.epochs * steps_per_epoch))
    warm = max(1, round(cfg.warmup_share * total))
    history: list[dict[str, float]] = []
    sums = [0.0, 0.0, 0.0, 0]
    codec.train()
    _freeze_norms(codec)
    bar = tqdm(total=total, desc=f"distil codec at cut {cm.cut}", unit="step", disable=not cfg.progress, leave=False)
    order, pos, t0 = torch.randperm(len(x_train), generator=gen), 0, time.perf_counter()
    T = cfg.temperature
    for step in range(total):
        if pos + bs > steps_per_epoch * bs:
            order, pos = torch.randperm(len(x_train), generator=gen), 0
        idx = order[pos:pos + bs]
        pos += bs
        lr = cfg.lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / total))
        for g in opt.param_groups:
            g["lr"] = lr
        budget = choices[int(torch.multinomial(probs, 1, generator=gen))][0]
        h, teacher = acts.get(idx)
        h_hat = codec(h, budget, cfg.wire_dtype)  # straight-through link: mask, cast, decode
        student = cm.tail(h_hat)
        kl = F.kl_div(F.log_softmax(student / T, dim=1), F.log_softmax(teacher / T, dim=1), reduction="batchmean",
                      log_target=True) * T * T
        mse = ((h_hat - h) * inv_std).pow(2).mean()
        loss = kl + cfg.mse_weight * mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums = [sums[0] + loss.item(), sums[1] + kl.item(), sums[2] + mse.item(), sums[3] + 1]
        bar.update(1)
        if (step + 1) % steps_per_epoch == 0 or step == total - 1:
            n = sums[3]
            history.append({"epoch": round((step + 1) / steps_per_epoch, 4), "loss": sums[0] / n, "kl": sums[1] / n,
                            "mse": sums[2] / n, "seconds": time.perf_counter() - t0})
            bar.set_postfix(kl=f"{sums[1] / n:.4f}", mse=f"{sums[2] / n:.3f}")
            sums = [0.0, 0.0, 0.0, 0]
    bar.close()
    codec.eval()
    return history


def _norms(codec: FilteredCodec) -> list[nn.Module]:
    return [m for m in codec.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, BudgetNorm))]


def _freeze_norms(codec: FilteredCodec) -> None:
    """Batch norms in eval mode: their statistics stay what initialisation set (their affine maps still train)."""
    for m in _norms(codec):
        m.eval()


@torch.no_grad()
def calibrate_norms(codec: FilteredCodec, h: torch.Tensor, budgets: Sequence[int | None], wire_dtype: str,
                    batch_size: int = 128) -> None:
    """Set the codec's batch-norm statistics to exact averages over activations ``h`` with its current weights.

    First the encoder's (shared by every budget), then, with the encoder fixed, each budget's row
    of the decoder's ``BudgetNorm``. Budgets not in ``budgets`` keep their statistics.
    """
    enc_bns = [m for m in codec.encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    dec_bns = [m for m in codec.decoder.modules() if isinstance(m, BudgetNorm)]
    chunks = [h[i:i + batch_size] for i in range(0, len(h), batch_size)]
    saved = [m.momentum for m in enc_bns]
    codec.train()
    for m in enc_bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    for x in chunks:
        codec.encode_tensor(x)
    for m, mom in zip(enc_bns, saved):
        m.momentum = mom
    codec.encoder.eval()
    dec_saved = [(m.momentum, m.warmup) for m in dec_bns]
    for m in dec_bns:
        m.momentum, m.warmup = 0.0, True  # max(0, 1/(n+1)): an exact cumulative average over the batches
        for b in budgets:
            r = m.row(b)
            m.running_mean[r].zero_()
            m.running_var[r].fill_(1.0)
            m.batches_seen[r] = 0
    for b in budgets:
        for x in chunks:
            codec(x, b, wire_dtype)
    for m, (mom, warm) in zip(dec_bns, dec_saved):
        m.momentum, m.warmup = mom, warm
    codec.eval()


PCA_SIGMOID_GAIN = 0.5  # the encoder's BN scales each unit-variance component by this: sigmoid stays near-linear
PCA_FILTER_LOGITS = (8.0, 6.0)  # filter p from the first component to the last: ranks them in order, sigmoid(p) ~ 1


@torch.no_grad()
def pca_init(codec: FilteredCodec, h: torch.Tensor, budgets: Sequence[int | None]) -> bool:
    """Start the codec as the activation's PCA: component c on channel c, ranked first to last.

    Encoder: ``z = U_k^T (h - mu)``, normalised to unit variance and scaled by
    ``PCA_SIGMOID_GAIN`` before the sigmoid, times sigmoid(p) with p decreasing over the
    components (so budget b keeps the top b). Decoder: the linearised inverse,
    ``mu + U_k sqrt(lambda) z``, whose batch norm then passes it through (statistics and affine
    map set to cancel). Each budget's row gets the mean its output has (the dropped components'
    offset) and full width's variance, so budget b decodes to the top-b reconstruction.
    Works for "tokens" codecs and for "fmap" codecs with r = 1 (the 3x3 kernels' centre taps);
    returns False, changing nothing, for others.

    Args:
        h: activations at the cut, batch first (a few hundred inputs).
        budgets: the budgets (and None) whose decoder statistics to set.
    """
    if isinstance(codec, TokenCodec):
        enc_w, enc_b = codec.encoder["fc"].weight, codec.encoder["fc"].bias  # (k, D), (k,)
        dec_w, dec_b = codec.decoder["fc"].weight, codec.decoder["fc"].bias  # (D, k), (D,)
        enc_bn, dec_bn = codec.encoder["bn"], codec.decoder["bn"]
        x = h.reshape(-1, h.shape[-1])  # (N*T, D)
    elif isinstance(codec, FeatureMapCodec) and codec.r == 1:
        conv, deconv = codec.encoder[0], codec.decoder["conv"]
        enc_w, enc_b = conv.weight[:, :, 1, 1], conv.bias  # centre taps: (k, C)
        dec_w, dec_b = deconv.weight[:, :, 1, 1].T, deconv.bias  # ConvTranspose2d weight is (in, out, kh, kw)
        enc_bn, dec_bn = codec.encoder[1], codec.decoder["bn"]
        conv.weight.zero_()
        deconv.weight.zero_()
        x = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # (N, C, H, W) -> (N*H*W, C)
    else:
        return False
    k = codec.width
    if k > x.shape[1] or x.shape[0] < 2:
        return False
    xd = x.double()
    mu = xd.mean(0)
    lam, vec = torch.linalg.eigh(torch.cov(xd.T))  # ascending
    lam, vec = lam.flip(0)[:k], vec.flip(1)[:, :k]  # (k,), (D, k): largest first
    lam = lam.clamp_min(1e-6 * float(lam[0]) + 1e-12)
    var = xd.var(0).clamp_min(1e-12)
    gain = PCA_SIGMOID_GAIN
    p = torch.linspace(*PCA_FILTER_LOGITS, k, dtype=torch.float64)
    s = torch.sigmoid(p)
    # sigmoid(gain * z) ~ 1/2 + gain * z / 4, times s  =>  z ~ (4 / gain) * (received / s - 1/2)
    scale = lam.sqrt() * (4.0 / gain)
    enc_w.copy_(vec.T.to(enc_w))
    enc_b.copy_((-vec.T @ mu).to(enc_b))
    enc_bn.running_mean.zero_()
    enc_bn.running_var.copy_(lam.to(enc_bn.running_var))
    enc_bn.weight.fill_(gain)
    enc_bn.bias.zero_()
    codec.filter_logits.copy_(p.to(codec.filter_logits))
    dec_w.copy_((vec * (scale / s)).to(dec_w))
    dec_b.copy_((mu - vec @ (scale * 0.5)).to(dec_b))
    dec_bn.weight.copy_(var.sqrt().to(dec_bn.weight))
    dec_bn.bias.copy_(mu.to(dec_bn.bias))
    was = codec.training
    codec.eval()
    z = codec.encode_tensor(h)
    axis = codec.axis
    for b in budgets:
        _, mask = codec.mask(b)
        zb = z if mask is None else z * mask.to(z).reshape([-1 if d == axis else 1 for d in range(z.dim())])
        y = _decoder_input(codec, zb, h)  # the decoder's pre-norm output, channels last
        r = dec_bn.row(b)
        dec_bn.running_mean[r].copy_(y.double().mean(0).to(dec_bn.running_mean))
        dec_bn.running_var[r].copy_((var * 1.0).to(dec_bn.running_var))
        dec_bn.batches_seen[r] = 1
    codec.train(was)
    return True


def _decoder_input(codec: FilteredCodec, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """What the decoder's batch norm sees for a (masked) encoded ``z``, as (positions, channels)."""
    if isinstance(codec, TokenCodec):
        return codec.decoder["fc"](z).reshape(-1, codec.dim)
    y = codec.decoder["conv"](z, output_size=list(h.shape[2:]))  # (N, C, H, W)
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


# --- evaluation ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CutPoint:
    """One operating point of a codec, measured through real ``encode``/``decode``."""

    budget: int | None  # None = full width
    wire_dtype: str
    bytes_per_sample: int  # header + frames of a one-sample message (int8 scales included)
    ratio: float  # the full-width fp32 message over this one
    agreement: float  # percent of held-out inputs whose top-1 equals the uncompressed model's
    accuracy: float | None  # percent correct against labels (None without labels)


@dataclass(frozen=True)
class CutBaseline:
    """The uncompressed model on the same held-out inputs."""

    accuracy: float | None  # percent (None without labels)
    bytes_per_sample: int  # full-width fp32 message of the codec's wire format
    samples: int


@torch.no_grad()
def evaluate_cut(codec: FilteredCodec, cm: CutModel, x: torch.Tensor, y: torch.Tensor | None,
                 budgets: Sequence[int | None], wire_dtypes: Sequence[str], batch_size: int = 128
                 ) -> tuple[CutBaseline, list[CutPoint]]:
    """Agreement (and accuracy, with labels) of the model with ``codec`` at every budget x wire dtype.

    Every batch is encoded to bytes and decoded back, as a worker pair would.
    """
    codec.eval()
    acts = _Activations(cm, x, 1 << 62, batch_size)  # held-out sets are small: always cached
    assert acts.h is not None and acts.t is not None
    ref_pred = acts.t.argmax(1)
    one = (1, *cm.shape)
    full_bytes = codec.wire_nbytes(one, None, "fp32")
    base = CutBaseline(None if y is None else _percent(ref_pred, y), full_bytes, len(x))
    points = []
    for b in budgets:
        for d in wire_dtypes:
            preds = []
            for i in range(0, len(x), batch_size):
                header, frames = codec.encode(acts.h[i:i + batch_size], budget=b, wire_dtype=d)
                preds.append(cm.tail(codec.decode(header, frames)).argmax(1))
            pred = torch.cat(preds)
            nbytes = codec.wire_nbytes(one, b, d)
            points.append(CutPoint(b, d, nbytes, full_bytes / nbytes, _percent(pred, ref_pred),
                                   None if y is None else _percent(pred, y)))
    return base, points


def _percent(a: torch.Tensor, b: torch.Tensor) -> float:
    return 100.0 * int((a == b).sum()) / len(b)


def planner_points(base: CutBaseline, points: Sequence[CutPoint]) -> list[list[Any]]:
    """``[[budget, bytes_per_sample, accuracy_cost], ...]`` at the runtime's default wire dtype, for the planner.

    The cost is the accuracy points lost against the uncompressed model when there are labels,
    else the percent of inputs on which the top-1 changes (an upper bound of the accuracy lost).
    """
    out = []
    for p in points:
        if p.wire_dtype != PLANNER_WIRE_DTYPE:
            continue
        cost = max(0.0, base.accuracy - p.accuracy) if base.accuracy is not None and p.accuracy is not None \
            else 100.0 - p.agreement
        out.append([p.budget, p.bytes_per_sample, round(cost, 4)])
    return out


def format_points(base: CutBaseline, points: Sequence[CutPoint]) -> str:
    """The budget x dtype table as text."""
    acc = "-" if base.accuracy is None else f"{base.accuracy:.2f} %"
    lines = [f"uncompressed: accuracy {acc}, {base.bytes_per_sample:,} B/sample at full width fp32 "
             f"({base.samples} held-out inputs)",
             f"{'budget':>7} {'dtype':>5} {'bytes/sample':>13} {'vs fp32':>8} {'agreement':>10} {'accuracy':>9}"]
    for p in points:
        acc = "-" if p.accuracy is None else f"{p.accuracy:.2f} %"
        lines.append(f"{'full' if p.budget is None else p.budget:>7} {p.wire_dtype:>5} {p.bytes_per_sample:>13,} "
                     f"{p.ratio:>7.1f}x {p.agreement:>8.2f} % {acc:>9}")
    return "\n".join(lines)
