"""Class-wise split (ED-ViT, after EC-SNN/NNFacet): per-class-group pruned sub-models plus a fusion MLP.

Pipeline (``split_classwise``):

1. **Grouping**: the C classes are divided into N balanced groups (sizes differ by at most
   one), or a user-given grouping is checked and used.
2. **Pruning**: for each group, a copy of the trained full model is scored on that group's
   samples only and physically pruned (``prune_vit`` / ``prune_resnet`` state the criteria),
   then retrained with ``|group| + 1`` outputs: the group's classes in order, then one
   "another group's class" output, trained on all of the group's samples plus negatives
   down-sampled from the other classes (a fresh draw every epoch).
3. **Assignment** (when worker budgets are given): greedy placement; a sub-model that fits
   nowhere is pruned harder and retrained (``assign.assign_with_pruning``).
4. **Fusion**: a small MLP over the concatenated sub-model features, trained with the
   sub-models frozen, gives the C-way prediction.

What goes into the block store (all rebuildable from the store alone):

- each sub-model as its own manifest ``<package>.g<i>`` in **feature form**: its recipe has
  ``num_classes=0``, so its last block (``head``) returns the pooled feature vector (the
  final-norm CLS embedding of a ViT, the global-average-pooled channels of a ResNet). The
  ``|group| + 1`` classifier only served to train those features and is not stored.
- the fusion MLP as the manifest named ``<package>`` itself (one block, input = the
  concatenated features), whose ``extra["classwise"]`` holds the descriptor
  (:class:`ClasswiseDescriptor`): groups, sub-model manifest names, feature dims, fusion
  manifest name. A runtime that finds ``extra["classwise"]`` fans the input out to the
  sub-models, concatenates their features in descriptor order and runs the fusion.

``classwise_predict`` is the one-process reference of that runtime behaviour.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .assign import SubModelCost, WorkerBudget, assign_with_pruning, count_mflop
from .builders import register_builder
from .errors import EdgesplitError, ManifestError, UnsupportedModelError
from .layerwise import load_model, partition
from .manifest import ModelManifest
from .prune_resnet import ResNetPruneConfig, plan_resnet_pruning, prune_resnet, score_resnet
from .prune_vit import ViTPruneConfig, plan_vit_pruning, prune_vit, score_vit
from .store import BlockStore

CLASSWISE_KEY = "classwise"  # manifest.extra key of the descriptor (on the fusion / package manifest)
GROUP_KEY = "classwise_group"  # manifest.extra key on each sub-model: {"package", "group", "classes"}
DESCRIPTOR_VERSION = 1


class GroupingError(EdgesplitError, ValueError):
    """A class grouping is not a partition of the classes into non-empty groups."""


# --- 1. grouping ------------------------------------------------------------------------

def balanced_groups(n_classes: int, n_groups: int) -> list[list[int]]:
    """Classes 0..C-1 in N contiguous groups whose sizes differ by at most one (larger first).

    Args:
        n_classes: C.
        n_groups: N, 1 <= N <= C.
    Returns:
        N lists of class indices, e.g. C=10, N=3 -> [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]].
    """
    if not 1 <= n_groups <= n_classes:
        raise GroupingError(f"cannot divide {n_classes} classes into {n_groups} non-empty groups; "
                            f"choose 1..{n_classes} groups")
    base, extra = divmod(n_classes, n_groups)
    out, start = [], 0
    for g in range(n_groups):
        size = base + (1 if g < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def check_groups(groups: list[list[int]], n_classes: int) -> list[list[int]]:
    """Validate a user-given grouping: every class 0..C-1 in exactly one non-empty group.

    Returns:
        The groups as lists of ints (order kept).
    """
    groups = [[int(c) for c in g] for g in groups]
    seen: dict[int, int] = {}
    for i, g in enumerate(groups):
        if not g:
            raise GroupingError(f"group {i} is empty; every group needs at least one class")
        for c in g:
            if not 0 <= c < n_classes:
                raise GroupingError(f"class {c} in group {i} is outside 0..{n_classes - 1}")
            if c in seen:
                raise GroupingError(f"class {c} is in group {seen[c]} and group {i}; each class belongs to one group")
            seen[c] = i
    missing = sorted(set(range(n_classes)) - set(seen))
    if missing:
        raise GroupingError(f"classes {missing} are in no group; the groups must cover all {n_classes} classes")
    return groups


# --- 2. sub-model label space and data ----------------------------------------------------

def group_targets(y: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Relabel for a group's sub-model: ``classes[i] -> i``, every other class -> ``len(classes)``."""
    out = torch.full(y.shape, len(classes), dtype=torch.long)
    for i, c in enumerate(classes):
        out[y == c] = i
    return out


def sample_group(y: torch.Tensor, classes: list[int], negatives_per_positive: float,
                 gen: torch.Generator) -> torch.Tensor:
    """Indices of all the group's samples plus down-sampled negatives, spread evenly over the other classes.

    Args:
        y: (N,) class labels.
        classes: the group's classes.
        negatives_per_positive: negatives drawn per positive (EC-SNN down-samples negatives).
        gen: random generator (a fresh draw per call).
    Returns:
        (M,) sample indices, positives first.
    """
    pos_mask = torch.isin(y, torch.tensor(classes))
    pos = torch.nonzero(pos_mask).flatten()
    others = sorted(set(y.tolist()) - set(classes))
    want = round(negatives_per_positive * pos.numel())
    neg = []
    for k, c in enumerate(others):
        share = want // len(others) + (1 if k < want % len(others) else 0)
        idx = torch.nonzero(y == c).flatten()
        neg.append(idx[torch.randperm(idx.numel(), generator=gen)[:share]])
    return torch.cat([pos, *neg]) if neg else pos


# --- training --------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """One supervised training run (AdamW with a one-cycle schedule)."""

    epochs: int = 20
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.05
    batch_size: int = 64
    label_smoothing: float = 0.1
    shift_px: int = 0  # random translation by up to this many pixels (images only; 0 = none)
    seed: int = 0


def random_shift(x: torch.Tensor, max_px: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_px`` pixels in each direction, edges replicated."""
    if max_px <= 0:
        return x
    B, _, H, W = x.shape
    xp = F.pad(x, (max_px,) * 4, mode="replicate")  # (B, C, H + 2p, W + 2p)
    off = torch.randint(0, 2 * max_px + 1, (2, B), generator=gen)
    rows = (off[0][:, None] + torch.arange(H)[None])[:, None, :, None]  # (B, 1, H, 1)
    cols = (off[1][:, None] + torch.arange(W)[None])[:, None, None, :]  # (B, 1, 1, W)
    b = torch.arange(B)[:, None, None, None]
    c = torch.arange(x.shape[1])[None, :, None, None]
    return xp[b, c, rows, cols]  # (B, C, H, W)


def train_classifier(model: nn.Module, data: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]],
                     cfg: TrainConfig) -> nn.Module:
    """Train ``model`` with cross-entropy; ``data(gen)`` gives each epoch's (x, y), all epochs the same size.

    Returns:
        The model, in eval mode.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = data(gen)
    steps_per_epoch = -(-x.shape[0] // cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.15)
    model.train()
    for epoch in range(cfg.epochs):
        if epoch:
            x, y = data(gen)
        perm = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], cfg.batch_size):
            j = perm[start:start + cfg.batch_size]
            if j.numel() < 2:  # BatchNorm cannot train on one sample (1x1 maps late in a ResNet)
                continue
            xb = random_shift(x[j], cfg.shift_px, gen) if x.dim() == 4 else x[j]
            loss = F.cross_entropy(model(xb), y[j], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched.last_epoch + 1 < sched.total_steps:
                sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``model(x)`` in eval mode, in batches."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


# --- 2. pruning, per model family ---------------------------------------------------------

@dataclass(frozen=True)
class ClasswiseConfig:
    """Everything the class-wise pipeline needs besides the model and data."""

    vit: ViTPruneConfig = ViTPruneConfig()
    resnet: ResNetPruneConfig = ResNetPruneConfig()
    retrain: TrainConfig = TrainConfig(epochs=20)  # sub-model retraining on its group
    negatives_per_positive: float = 1.0  # "other classes" samples per group sample, per epoch
    score_samples: int = 512  # at most this many group samples are used for scoring
    fusion: TrainConfig = TrainConfig(epochs=60, lr=3e-3, weight_decay=1e-2, label_smoothing=0.0)
    fusion_hidden: int = 128  # hidden width of the fusion MLP
    fusion_dropout: float = 0.2
    fusion_views: int = 1  # training-set passes (randomly shifted after the first) used as fusion data
    harder_factor: float = 0.7  # keep fractions are multiplied by this per harder pruning round
    max_reprune_rounds: int = 3


def _family(model: nn.Module) -> str:
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, ResNet):
        return "resnet"
    raise UnsupportedModelError(f"class-wise split supports timm VisionTransformer and ResNet (BasicBlock); "
                                f"got {type(model).__name__}")


def prune_for_group(model: nn.Module, recipe: dict[str, Any], x_group: torch.Tensor, classes: list[int],
                    config: ClasswiseConfig, harder: float = 1.0) -> tuple[nn.Module, dict[str, Any]]:
    """Score ``model`` on one group's samples and build its physically pruned ``|group| + 1``-way copy.

    Args:
        model: the trained full model (timm ViT or ResNet).
        recipe: its timm recipe.
        x_group: samples of the group's classes only.
        classes: the group's classes.
        config: pruning fractions and floors.
        harder: extra factor on every keep fraction (1 = as configured).
    Returns:
        (pruned model with ``len(classes) + 1`` logits, its recipe).
    """
    x_group = x_group[:config.score_samples]
    if _family(model) == "vit":
        cfg = config.vit.harder(harder) if harder != 1.0 else config.vit
        plan = plan_vit_pruning(score_vit(model, x_group), cfg)
        return prune_vit(model, recipe, plan, classes)
    cfg_r = config.resnet.harder(harder) if harder != 1.0 else config.resnet
    plan_r = plan_resnet_pruning(model, score_resnet(model, x_group), cfg_r)
    return prune_resnet(model, recipe, plan_r, classes)


def to_feature_form(model: nn.Module, recipe: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """Drop the classifier: the model (and its recipe) then return pooled features."""
    model.reset_classifier(0)
    kwargs = dict(recipe["kwargs"], num_classes=0)
    return model.eval(), {**recipe, "kwargs": kwargs}


def train_submodel(model: nn.Module, recipe: dict[str, Any], x: torch.Tensor, y: torch.Tensor,
                   classes: list[int], config: ClasswiseConfig, seed: int = 0,
                   harder: float = 1.0) -> tuple[nn.Module, dict[str, Any]]:
    """Prune the full model for one group, retrain it on the group, return it in feature form.

    Args:
        model: the trained full model.
        recipe: its timm recipe.
        x, y: the training set (all classes).
        classes: the group's classes.
        config: pipeline settings.
        seed: seeds negative sampling, augmentation and the new "other" output row.
        harder: extra factor on every keep fraction.
    Returns:
        (sub-model returning features, its feature-form recipe).
    """
    torch.manual_seed(seed)
    pos = torch.isin(y, torch.tensor(classes))
    sub, sub_recipe = prune_for_group(model, recipe, x[pos], classes, config, harder)

    def data(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = sample_group(y, classes, config.negatives_per_positive, gen)
        return x[idx], group_targets(y[idx], classes)

    train_classifier(sub, data, replace(config.retrain, seed=config.retrain.seed + seed))
    return to_feature_form(sub, sub_recipe)


# --- 3. fusion --------------------------------------------------------------------------

class FusionMLP(nn.Module):
    """LayerNorm over the concatenated sub-model features, then a one-hidden-layer MLP to C logits."""

    def __init__(self, feature_dims: list[int], hidden: int, n_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        width = sum(feature_dims)
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(self.norm(feats)))))  # (B, sum d_i) -> (B, C)


@register_builder("classwise_fusion")
def build_fusion(feature_dims: list[int], hidden: int, n_classes: int, dropout: float = 0.0) -> nn.Module:
    """The fusion head as a one-block model (so it is stored and loaded like any model)."""
    return nn.Sequential(FusionMLP(list(feature_dims), hidden, n_classes, dropout))


def fusion_recipe(feature_dims: list[int], hidden: int, n_classes: int, dropout: float) -> dict[str, Any]:
    return {"builder": "classwise_fusion", "kwargs": {"feature_dims": [int(d) for d in feature_dims],
                                                      "hidden": int(hidden), "n_classes": int(n_classes),
                                                      "dropout": float(dropout)}}


@torch.no_grad()
def concat_features(submodels: list[nn.Module], x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Run every sub-model on ``x`` and concatenate their features in order: (B, sum d_i)."""
    return torch.cat([predict(m, x, batch_size) for m in submodels], dim=1)


def train_fusion(submodels: list[nn.Module], x: torch.Tensor, y: torch.Tensor, n_classes: int,
                 config: ClasswiseConfig) -> nn.Module:
    """Train the fusion MLP on the frozen sub-models' features of the training set.

    Returns:
        The fusion head as the one-block ``nn.Sequential`` that ``build_fusion`` builds.
    """
    gen = torch.Generator().manual_seed(config.fusion.seed)
    views_x, views_y = [concat_features(submodels, x)], [y]
    for _ in range(config.fusion_views - 1):  # shifted copies, so the MLP sees features of unseen inputs
        views_x.append(concat_features(submodels, random_shift(x, config.retrain.shift_px, gen)))
        views_y.append(y)
    feats, labels = torch.cat(views_x), torch.cat(views_y)
    dims = [int(m.num_features) for m in submodels]
    torch.manual_seed(config.fusion.seed)
    fusion = build_fusion(dims, config.fusion_hidden, n_classes, config.fusion_dropout)
    return train_classifier(fusion, lambda g: (feats, labels), config.fusion)


# --- the package in the store -------------------------------------------------------------

@dataclass(frozen=True)
class ClasswiseDescriptor:
    """What a runtime needs to run a class-wise model (kept in ``manifest.extra["classwise"]``)."""

    n_classes: int
    groups: list[list[int]]
    submodels: list[str]  # manifest names, in fusion input order; each returns (B, feature_dims[i])
    feature_dims: list[int]
    fusion: str  # manifest name of the fusion head: (B, sum feature_dims) -> (B, n_classes)
    assignment: dict[str, str] = field(default_factory=dict)  # sub-model -> worker, when budgets were given

    def to_extra(self) -> dict[str, Any]:
        return {"version": DESCRIPTOR_VERSION, "n_classes": self.n_classes, "groups": self.groups,
                "submodels": self.submodels, "feature_dims": self.feature_dims, "fusion": self.fusion,
                "assignment": dict(self.assignment)}

    @classmethod
    def from_extra(cls, extra: dict[str, Any], model: str = "?") -> "ClasswiseDescriptor":
        raw = extra.get(CLASSWISE_KEY)
        if raw is None:
            raise ManifestError(f"model {model} is not a class-wise package (no extra[{CLASSWISE_KEY!r}]); "
                                "create one with split_classwise or `edgesplit partition --classwise N`")
        try:
            if raw["version"] != DESCRIPTOR_VERSION:
                raise ManifestError(f"class-wise descriptor of {model} has version {raw['version']}, "
                                    f"expected {DESCRIPTOR_VERSION}")
            d = cls(n_classes=int(raw["n_classes"]), groups=[list(map(int, g)) for g in raw["groups"]],
                    submodels=[str(s) for s in raw["submodels"]], feature_dims=[int(v) for v in raw["feature_dims"]],
                    fusion=str(raw["fusion"]),
                    assignment={str(k): str(v) for k, v in raw.get("assignment", {}).items()})
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"malformed class-wise descriptor in model {model}: {e}") from None
        if not (len(d.groups) == len(d.submodels) == len(d.feature_dims)):
            raise ManifestError(f"class-wise descriptor of {model} lists {len(d.groups)} groups, "
                                f"{len(d.submodels)} sub-models and {len(d.feature_dims)} feature dims")
        check_groups(d.groups, d.n_classes)
        return d


@dataclass
class ClasswisePackage:
    """Result of ``split_classwise``: the descriptor, the stored manifests and the in-memory modules."""

    descriptor: ClasswiseDescriptor
    manifests: dict[str, ModelManifest]  # by name: the sub-models and the fusion head
    submodels: list[nn.Module]  # feature form, in descriptor order
    fusion: nn.Module
    costs: list[SubModelCost]


def submodel_name(package: str, group: int) -> str:
    """Store name of group ``group``'s sub-model."""
    return f"{package}.g{group}"


def split_classwise(model: nn.Module, recipe: dict[str, Any], name: str, store: BlockStore,
                    x: torch.Tensor, y: torch.Tensor, n_groups: int | None = None,
                    groups: list[list[int]] | None = None, n_classes: int | None = None,
                    config: ClasswiseConfig = ClasswiseConfig(),
                    workers: list[WorkerBudget] | None = None) -> ClasswisePackage:
    """Turn a trained model and its training data into a class-wise package in ``store``.

    Args:
        model: the trained full timm ViT or ResNet (CPU).
        recipe: its timm recipe (``timm_recipe(arch, **kwargs)``).
        name: package name; the fusion manifest gets it, sub-models ``<name>.g<i>``.
        store: destination block store.
        x, y: training samples (B, C, H, W) and labels (B,) of all classes.
        n_groups: N balanced groups (or give ``groups``).
        groups: user-given grouping (a partition of the classes).
        n_classes: C; defaults to ``max(y) + 1``.
        config: pipeline settings.
        workers: worker budgets; when given, sub-models are placed greedily and pruned
            harder until they fit (the placement goes into the descriptor).
    Returns:
        The package (descriptor, manifests, in-memory sub-models and fusion head).
    Raises:
        GroupingError: bad grouping. AssignmentError: a sub-model fits nowhere even pruned harder.
    """
    n_classes = int(y.max()) + 1 if n_classes is None else n_classes
    if groups is not None:
        groups = check_groups(groups, n_classes)
    elif n_groups is not None:
        groups = balanced_groups(n_classes, n_groups)
    else:
        raise GroupingError("give n_groups or groups")
    input_shape = list(x.shape[1:])
    names = [submodel_name(name, i) for i in range(len(groups))]
    subs: list[nn.Module] = []
    recipes: list[dict[str, Any]] = []
    manifests: dict[str, ModelManifest] = {}

    def build(i: int, harder: float) -> SubModelCost:
        sub, rec = train_submodel(model, recipe, x, y, groups[i], config, seed=i, harder=harder)
        if i < len(subs):
            subs[i], recipes[i] = sub, rec
        else:
            subs.append(sub)
            recipes.append(rec)
        manifests[names[i]] = partition(sub, names[i], rec, store, input_shape=input_shape,
                                        extra={GROUP_KEY: {"package": name, "group": i, "classes": groups[i]}})
        return SubModelCost(names[i], manifests[names[i]].size_bytes, count_mflop(sub, input_shape))

    costs = [build(i, 1.0) for i in range(len(groups))]
    assignment: dict[str, str] = {}
    if workers is not None:
        assignment, costs = assign_with_pruning(
            costs, workers, lambda n, r: build(names.index(n), config.harder_factor ** r), config.max_reprune_rounds)
    fusion = train_fusion(subs, x, y, n_classes, config)
    desc = ClasswiseDescriptor(n_classes=n_classes, groups=groups, submodels=names,
                               feature_dims=[int(s.num_features) for s in subs], fusion=name, assignment=assignment)
    f_recipe = fusion_recipe(desc.feature_dims, config.fusion_hidden, n_classes, config.fusion_dropout)
    manifests[name] = partition(fusion, name, f_recipe, store, input_shape=[sum(desc.feature_dims)],
                                extra={CLASSWISE_KEY: desc.to_extra()})
    return ClasswisePackage(descriptor=desc, manifests=manifests, submodels=subs, fusion=fusion, costs=costs)


def load_classwise(store: BlockStore, name: str,
                   device: str | torch.device = "cpu") -> tuple[ClasswiseDescriptor, list[nn.Module], nn.Module]:
    """Rebuild a class-wise package from the store alone: (descriptor, sub-models, fusion head)."""
    desc = ClasswiseDescriptor.from_extra(store.manifest(name).extra, name)
    subs = [load_model(store, store.manifest(n), device) for n in desc.submodels]
    return desc, subs, load_model(store, store.manifest(desc.fusion), device)


@torch.no_grad()
def classwise_predict(store: BlockStore, package_name: str, x: torch.Tensor) -> torch.Tensor:
    """One-process reference of class-wise inference: sub-model features, concatenated, fused.

    Args:
        store: block store holding the package.
        package_name: the package's (fusion manifest's) name.
        x: (B, C, H, W) inputs.
    Returns:
        (B, n_classes) logits.
    """
    desc, subs, fusion = load_classwise(store, package_name)
    feats = [m(x) for m in subs]
    for f, d, n in zip(feats, desc.feature_dims, desc.submodels):
        if f.shape[1:] != (d,):
            raise ManifestError(f"sub-model {n} returns features of shape {tuple(f.shape[1:])}, descriptor says ({d},)")
    return fusion(torch.cat(feats, dim=1))  # (B, sum d_i) -> (B, C)
