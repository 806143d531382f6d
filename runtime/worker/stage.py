"""What the worker's loops share about hosted stages: the stage record, its statistics, input checks."""
from __future__ import annotations

import bisect
import collections
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgesplit.partitioner import ManifestError, ModelManifest, build_skeleton, decompose

from ..errors import BadInput
from ..links import LinkCodec, LinkSpec
from ..types import StageInfo


@dataclass
class Stage:
    """A hosted stage: its place on the route, the module, its block ids, and the codecs of its two links."""

    info: StageInfo
    module: nn.Module
    block_ids: list[str]
    in_shape: list[int]  # per-sample input shape
    link_in: LinkSpec  # how its input arrives (the previous cut)
    link_out: LinkSpec  # how its output leaves (the next cut)
    codec_in: LinkCodec | None  # None = raw
    codec_out: LinkCodec | None
    sizes: list[int] = field(default_factory=list)  # bytes per block, from the manifest
    loaded: list[bool] = field(default_factory=list)  # per block: parameters alias the cache (else meta)
    prev: tuple[str, ...] = ()  # keyed: endpoints of the previous hop's workers, the only senders of its RUNs

    def __post_init__(self) -> None:
        self.children = list(self.module.children())
        if not self.loaded:
            self.loaded = [False] * len(self.block_ids)
        self._slots = [_slots_of(c) for c in self.children]

    def bind(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        """Point block ``i``'s parameters and buffers at ``tensors`` (no copy; names, shapes, dtypes checked).

        What ``load_state_dict(assign=True)`` does, without its per-call overhead: a switch
        binds and unbinds whole blocks, and that overhead was a fifth of a 28 MB switch.
        """
        slots = self._slots[i]
        if tensors.keys() != slots.keys():
            raise ManifestError(f"block {self.block_ids[i][:12]} holds {sorted(tensors)[:4]}..., the stage's "
                                f"block {i} expects {sorted(slots)[:4]}...")
        for name, (owner, attr, is_param, meta) in slots.items():
            t = tensors[name]
            if t.shape != meta.shape or t.dtype != meta.dtype:
                raise ManifestError(f"block {self.block_ids[i][:12]}: {name} is {tuple(t.shape)} {t.dtype}, "
                                    f"the stage expects {tuple(meta.shape)} {meta.dtype}")
            if is_param:
                owner._parameters[attr] = nn.Parameter(t, requires_grad=False)
            else:
                owner._buffers[attr] = t
        self.loaded[i] = True

    def unbind(self, i: int) -> None:
        """Block ``i``'s state back on ``meta`` (no memory); non-persistent buffers stay."""
        for owner, attr, is_param, meta in self._slots[i].values():
            if is_param:
                owner._parameters[attr] = meta
            else:
                owner._buffers[attr] = meta
        self.loaded[i] = False

    @property
    def nbytes(self) -> int:
        """Bytes of the stage's blocks (what making it resident takes)."""
        return sum(self.sizes)


# Upper bounds (ms) of the compute-time histogram each stage reports (``StageStats.histograms``), fixed so the
# coordinator's Prometheus histograms add up across heartbeats and workers: 1 ms (a GPU block) to 10 s.
COMPUTE_BUCKETS_MS = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0)


class StageStats:
    """Recent compute times per stage and a histogram of all of them, read by the heartbeat (thread-safe)."""

    def __init__(self, window: int = 512) -> None:
        self.window = window
        self._lock = threading.Lock()
        self._ms: dict[tuple[str, int], collections.deque] = {}
        self._count: collections.Counter = collections.Counter()
        self._errors: collections.Counter = collections.Counter()
        self._buckets: dict[tuple[str, int], list[int]] = {}  # per bucket of COMPUTE_BUCKETS_MS, then +Inf
        self._sum_ms: collections.Counter = collections.Counter()

    def add(self, key: tuple[str, int], ms: float | None) -> None:
        with self._lock:
            if ms is None:
                self._errors[key] += 1
                return
            self._ms.setdefault(key, collections.deque(maxlen=self.window)).append(ms)
            self._count[key] += 1
            counts = self._buckets.setdefault(key, [0] * (len(COMPUTE_BUCKETS_MS) + 1))
            counts[bisect.bisect_left(COMPUTE_BUCKETS_MS, ms)] += 1  # le: a time equal to a bound counts in it
            self._sum_ms[key] += ms

    def forget_recent(self, key: tuple[str, int]) -> None:
        """Drop a stage's recent times (its median and mean start again); the counts and histograms stay."""
        with self._lock:
            self._ms.pop(key, None)

    def p50_ms(self, key: tuple[str, int]) -> float:
        """Median recent compute time of a stage (0 when never run)."""
        with self._lock:
            ms = sorted(self._ms.get(key, ()))
        return ms[len(ms) // 2] if ms else 0.0

    def report(self) -> list[list[Any]]:
        """``[[model, hop, n, compute_ms_p50, compute_ms_mean, errors], ...]``."""
        with self._lock:
            out = []
            for key in sorted(set(self._ms) | set(self._errors)):
                ms = sorted(self._ms.get(key, ()))
                p50 = ms[len(ms) // 2] if ms else 0.0
                mean = sum(ms) / len(ms) if ms else 0.0
                out.append([key[0], key[1], self._count[key], round(p50, 4), round(mean, 4), self._errors[key]])
            return out

    def histograms(self) -> list[list[Any]]:
        """``[[model, hop, sum_ms, [count per bucket of COMPUTE_BUCKETS_MS, then +Inf]], ...]`` since start."""
        with self._lock:
            return [[key[0], key[1], round(self._sum_ms[key], 3), list(counts)]
                    for key, counts in sorted(self._buckets.items())]


def check_input(x: torch.Tensor, stage: Stage, worker: str) -> None:
    """Raise BadInput unless ``x`` is a float32 batch of the stage's per-sample shape."""
    if x.dim() != len(stage.in_shape) + 1 or list(x.shape[1:]) != stage.in_shape:
        raise BadInput(f"stage {stage.info.hop} of {stage.info.model} on {worker} expects input (B, "
                       f"{', '.join(map(str, stage.in_shape))}), got {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise BadInput(f"stage {stage.info.hop} of {stage.info.model} expects float32 input, got {x.dtype}")


def stage_skeleton(manifest: ModelManifest, start: int, end: int, device: str | torch.device) -> nn.Sequential:
    """Blocks ``[start, end)`` with their parameters on ``meta``: a stage's shape, holding no memory.

    A block with non-persistent buffers (computed at init, e.g. position indices) is built for
    real and only its state moved to ``meta``, so those buffers survive.
    """
    blocks = decompose(build_skeleton(manifest.recipe, device="meta"))
    if len(blocks) != manifest.n_blocks:
        raise ManifestError(f"recipe of {manifest.name} builds {len(blocks)} blocks, manifest lists "
                            f"{manifest.n_blocks}; the manifest does not match its recipe")
    real = None
    out = nn.Sequential()
    for index in range(start, end):
        entry, module = manifest.blocks[index], blocks[index].module
        if entry.name != blocks[index].name:
            raise ManifestError(f"block {entry.name!r} of {manifest.name} rebuilds as {blocks[index].name!r}")
        persistent = set(module.state_dict())
        if any(n not in persistent for n, _ in module.named_buffers()):
            real = real or decompose(build_skeleton(manifest.recipe, device="cpu"))
            module = real[index].module.to(device)
            module.load_state_dict({k: v.to("meta") for k, v in module.state_dict().items()}, assign=True)
        out.add_module(entry.name.replace(".", "_"), module)
    return out.eval()


def _slots_of(block: nn.Module) -> dict[str, tuple[nn.Module, str, bool, torch.Tensor]]:
    """Per state-dict name of a (meta) block: the module owning it, its attribute, parameter or
    buffer, and a meta tensor of its shape to put back when the block is unbound."""
    out = {}
    for name, t in block.state_dict(keep_vars=True).items():
        path, _, attr = name.rpartition(".")
        owner = block.get_submodule(path) if path else block
        is_param = attr in owner._parameters
        meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
        out[name] = (owner, attr, is_param, nn.Parameter(meta, requires_grad=False) if is_param else meta)
    return out
