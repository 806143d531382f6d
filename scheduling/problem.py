"""The PartialLoading problem: models as block sets, requests, server, uplink (pure data).

After Qu et al., "PartialLoading: User Scheduling and Bandwidth Allocation for
Parameter-sharing Edge Inference" (arXiv 2503.22982), as DESIGN.md's "Scheduling model"
fixes it (the paper's own equations were not available to us).

Requests k (user, model m_k, input bytes D_k, inference time tau_k, deadline T_k,
arrival a_k) wait for one edge server. A model is a set J_m of parameter blocks with
sizes S_j; the server loads blocks at v bytes/s, switching from a to b loads J_b \\ J_a.
The uplink has total rate B. Objective: serve as many requests as possible, each ending
by its deadline. How an ordered served set is timed: ``timeline``; who gets how much of
the uplink: ``uplink``.

``Compiled`` reduces a problem to indices and floats once (switch-time matrix, which
pairs may overlap, the backbone-sharing shape when there is one); every algorithm works
on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from types import MappingProxyType
from typing import AbstractSet, Iterable, Mapping, Sequence

from . import uplink as bw
from .errors import ScheduleError

TIME_TOL_S = 1e-9  # deadline comparisons: float sums of seconds
POLICIES = ("edf", "static")
RATE_MODELS = ("linear", "shannon")


@dataclass(frozen=True)
class ModelLibrary:
    """Models as sets of parameter blocks; a block shared by two models is stored once."""

    block_bytes: Mapping[str, int]  # block id -> size in bytes
    models: Mapping[str, frozenset[str]]  # model name -> its block ids

    def __post_init__(self) -> None:
        sizes = dict(self.block_bytes)
        for bid, size in sizes.items():
            if not isinstance(size, int) or size < 0:
                raise ScheduleError(f"block {bid!r}: size must be an int >= 0 bytes, got {size!r}")
        models = {name: frozenset(blocks) for name, blocks in self.models.items()}
        for name, blocks in models.items():
            unknown = sorted(blocks - sizes.keys())
            if unknown:
                raise ScheduleError(f"model {name!r} uses unknown blocks {unknown[:5]}; add their sizes "
                                    "to block_bytes")
        object.__setattr__(self, "block_bytes", MappingProxyType(sizes))
        object.__setattr__(self, "models", MappingProxyType(models))

    def blocks_bytes(self, blocks: Iterable[str]) -> int:
        """Total size of ``blocks`` in bytes."""
        return sum(self.block_bytes[b] for b in blocks)

    def model_bytes(self, model: str) -> int:
        """Size of a whole model in bytes."""
        return self.blocks_bytes(self.models[model])

    def missing_bytes(self, resident: AbstractSet[str], model: str) -> int:
        """Bytes of ``model`` not in ``resident``: what switching to it loads."""
        return self.blocks_bytes(self.models[model] - resident)

    def oblivious(self) -> "ModelLibrary":
        """The same models with nothing shared: each model owns a private copy of its blocks.

        Planning on this library is the sharing-oblivious baseline: every switch to a
        different model reloads the whole model.
        """
        sizes = {f"{m}::{b}": self.block_bytes[b] for m, blocks in self.models.items() for b in blocks}
        models = {m: frozenset(f"{m}::{b}" for b in blocks) for m, blocks in self.models.items()}
        return ModelLibrary(sizes, models)

    @classmethod
    def from_backbones(cls, clusters: Mapping[str, tuple[Sequence[int], Mapping[str, Sequence[int]]]]
                       ) -> "ModelLibrary":
        """Build a backbone-sharing library from block sizes.

        Args:
            clusters: cluster name -> (backbone block sizes, {model: private block sizes}).
        Returns:
            A library where the models of a cluster share its backbone blocks and each
            model adds its own private blocks; nothing is shared across clusters.
        """
        sizes: dict[str, int] = {}
        models: dict[str, frozenset[str]] = {}
        for cname, (backbone, privates) in clusters.items():
            bb = [f"{cname}/bb{i}" for i in range(len(backbone))]
            sizes.update(zip(bb, (int(s) for s in backbone)))
            for mname, private in privates.items():
                if mname in models:
                    raise ScheduleError(f"model {mname!r} appears in two clusters; give it one")
                own = [f"{cname}/{mname}/p{i}" for i in range(len(private))]
                sizes.update(zip(own, (int(s) for s in private)))
                models[mname] = frozenset(bb + own)
        return cls(sizes, models)


@dataclass(frozen=True)
class BackboneStructure:
    """The backbone-sharing shape of a library, when it has one (see ``backbone_structure``)."""

    cluster_of: Mapping[str, int]  # model -> cluster index
    backbone_bytes: tuple[int, ...]  # per cluster: the blocks all its models share
    private_bytes: Mapping[str, int]  # model -> bytes of its own blocks


def backbone_structure(library: ModelLibrary, models: Iterable[str] | None = None) -> BackboneStructure | None:
    """Detect the backbone-sharing case: clusters share a backbone, each model adds private blocks.

    Clusters are the connected components of "shares a block". The case holds when, in
    every cluster, each block is either in all its models (backbone) or in exactly one
    (private). Then switching a -> b costs 0 if a == b, private(b) within a cluster, and
    backbone(b's cluster) + private(b) across clusters.

    Args:
        library: the models.
        models: restrict to these models (default all).
    Returns:
        The structure, or None when some block is shared by a strict subset of >= 2 models.
    """
    names = sorted(library.models if models is None else set(models))
    owner: dict[str, list[str]] = {}
    for m in names:
        for b in library.models[m]:
            owner.setdefault(b, []).append(m)
    parent = {m: m for m in names}

    def find(m: str) -> str:
        while parent[m] != m:
            parent[m] = parent[parent[m]]
            m = parent[m]
        return m

    for ms in owner.values():
        for m in ms[1:]:
            parent[find(m)] = find(ms[0])
    roots = sorted({find(m) for m in names})
    cluster_of = {m: roots.index(find(m)) for m in names}
    members = [[m for m in names if cluster_of[m] == c] for c in range(len(roots))]
    backbone = []
    private = {}
    for ms in members:
        shared = frozenset.intersection(*(library.models[m] for m in ms))
        for b, holders in owner.items():
            if cluster_of[holders[0]] == cluster_of[ms[0]] and 1 < len(holders) < len(ms):
                return None
        backbone.append(library.blocks_bytes(shared))
        for m in ms:
            private[m] = library.blocks_bytes(library.models[m] - shared)
    return BackboneStructure(MappingProxyType(cluster_of), tuple(backbone), MappingProxyType(private))


@dataclass(frozen=True)
class Request:
    """One user's inference request."""

    request_id: str
    user: str
    model: str
    input_bytes: int  # D_k: what the user uploads
    infer_s: float  # tau_k: inference time once model and input are there
    deadline_s: float  # T_k: absolute time by which the result must exist
    arrival_s: float = 0.0  # a_k: when the user may start uploading
    link_gain_hz: float = math.inf  # a = p*g/N0 for the Shannon rate model (Hz)


@dataclass(frozen=True)
class ServerConfig:
    """The edge server: how fast it loads blocks and what it holds at the planning time."""

    load_rate_bytes_per_s: float  # v: blocks -> accelerator memory
    start_s: float = 0.0  # t0: when the server is free and the plan starts
    resident_blocks: frozenset[str] = frozenset()  # R0: blocks in memory at t0
    overlap_load: bool = False  # may loading the next model overlap the current inference
    memory_budget_bytes: float = math.inf  # M: accelerator memory for blocks


@dataclass(frozen=True)
class UplinkConfig:
    """The shared uplink and how it is divided (see the module docstring)."""

    policy: str = "edf"  # "edf": one shared link, earliest due first; "static": constant shares
    rate_model: str = "linear"  # "linear" (fixed spectral efficiency) or "shannon" (static only)
    total_rate_bytes_per_s: float = math.inf  # B for the linear model
    total_bandwidth_hz: float = math.inf  # B for the Shannon model

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ScheduleError(f"uplink policy {self.policy!r} unknown; use one of {POLICIES}")
        if self.rate_model not in RATE_MODELS:
            raise ScheduleError(f"rate model {self.rate_model!r} unknown; use one of {RATE_MODELS}")
        if self.policy == "edf" and self.rate_model != "linear":
            raise ScheduleError("the EDF shared link is defined for the linear rate model only; "
                                "use policy='static' with rate_model='shannon'")
        if self.total_rate_bytes_per_s <= 0 or self.total_bandwidth_hz <= 0:
            raise ScheduleError("uplink totals must be > 0 (use math.inf for an unconstrained link)")


@dataclass(frozen=True)
class Problem:
    """A scheduling instance: library, requests, server and uplink."""

    library: ModelLibrary
    requests: tuple[Request, ...]
    server: ServerConfig
    uplink: UplinkConfig = field(default_factory=UplinkConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "requests", tuple(self.requests))
        if self.server.load_rate_bytes_per_s <= 0:
            raise ScheduleError(f"load rate must be > 0 bytes/s, got {self.server.load_rate_bytes_per_s}")
        seen = set()
        for r in self.requests:
            if r.request_id in seen:
                raise ScheduleError(f"request id {r.request_id!r} appears twice; ids must be unique")
            seen.add(r.request_id)
            if r.model not in self.library.models:
                raise ScheduleError(f"request {r.request_id!r} asks for model {r.model!r}, which is not in "
                                    f"the library ({len(self.library.models)} models)")
            if r.input_bytes < 0 or r.infer_s < 0:
                raise ScheduleError(f"request {r.request_id!r}: input_bytes and infer_s must be >= 0")
            if self.uplink.rate_model == "shannon" and not r.link_gain_hz > 0:
                raise ScheduleError(f"request {r.request_id!r}: the Shannon model needs link_gain_hz > 0")

    @cached_property
    def compiled(self) -> "Compiled":
        """Index-based view used by the evaluator and the schedulers."""
        return Compiled.of(self)

    def oblivious(self) -> "Problem":
        """This problem as a sharing-oblivious planner sees it: every switch reloads the whole model.

        A model counts as resident at t0 only if all its blocks are. Loading costs here
        are never below the true ones, so an order feasible here is feasible in ``self``.
        """
        lib = self.library.oblivious()
        r0 = self.server.resident_blocks
        resident = frozenset(f"{m}::{b}" for m, blocks in self.library.models.items() if blocks <= r0
                             for b in blocks)
        return replace(self, library=lib, server=replace(self.server, resident_blocks=resident))

    def index_of(self, request_ids: Iterable[str]) -> list[int]:
        """Positions of request ids in ``requests``."""
        pos = {r.request_id: i for i, r in enumerate(self.requests)}
        try:
            return [pos[rid] for rid in request_ids]
        except KeyError as err:
            raise ScheduleError(f"unknown request id {err.args[0]!r}") from None


@dataclass(frozen=True)
class Compiled:
    """A problem reduced to indices and floats: what every algorithm here works on.

    Models are the ones requested, indexed 0..F-1 in name order. ``switch_s[a][b]`` is
    the loading time from model a to b; row F is the start (resident set R0).
    """

    model_names: tuple[str, ...]
    model_of: tuple[int, ...]
    infer_s: tuple[float, ...]
    deadline_s: tuple[float, ...]
    input_bytes: tuple[int, ...]
    release_s: tuple[float, ...]
    link_gain_hz: tuple[float, ...]
    fits: tuple[bool, ...]  # per model: fits the memory budget
    switch_s: tuple[tuple[float, ...], ...]  # (F+1) x F
    switch_bytes: tuple[tuple[int, ...], ...]  # (F+1) x F
    overlap_ok: tuple[tuple[bool, ...], ...]  # F x F: may loading b overlap running a
    start_s: float
    policy: str
    rate_model: str
    uplink_budget: float  # bytes/s (linear) or Hz (Shannon)
    # backbone-sharing shape of the requested models, or None: (cluster of each model, per cluster the
    # time to load its backbone's blocks not in R0, per model the time to load its private ones not in R0)
    clusters: tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def n_requests(self) -> int:
        return len(self.model_of)

    @property
    def n_models(self) -> int:
        return len(self.model_names)

    @classmethod
    def of(cls, p: Problem) -> "Compiled":
        names = tuple(sorted({r.model for r in p.requests}))
        idx = {m: i for i, m in enumerate(names)}
        lib, srv = p.library, p.server
        blocks = [lib.models[m] for m in names]
        sizes = [lib.blocks_bytes(b) for b in blocks]
        v = srv.load_rate_bytes_per_s
        rows_b = [[lib.blocks_bytes(blocks[b] - blocks[a]) for b in range(len(names))] for a in range(len(names))]
        rows_b.append([lib.blocks_bytes(blocks[b] - srv.resident_blocks) for b in range(len(names))])
        overlap = [[srv.overlap_load and lib.blocks_bytes(blocks[a] | blocks[b]) <= srv.memory_budget_bytes
                    for b in range(len(names))] for a in range(len(names))]
        linear = p.uplink.rate_model == "linear"
        clusters = None
        shape = backbone_structure(lib, names) if names else None
        if shape is not None:
            cluster_of = tuple(shape.cluster_of[m] for m in names)
            n_clusters = max(cluster_of) + 1
            shared = [frozenset.intersection(*(blocks[i] for i in range(len(names)) if cluster_of[i] == cl))
                      for cl in range(n_clusters)]
            r0 = srv.resident_blocks
            clusters = (cluster_of, tuple(lib.blocks_bytes(b - r0) / v for b in shared),
                        tuple(lib.blocks_bytes(blocks[i] - shared[cluster_of[i]] - r0) / v for i in range(len(names))))
        return cls(
            model_names=names,
            model_of=tuple(idx[r.model] for r in p.requests),
            infer_s=tuple(float(r.infer_s) for r in p.requests),
            deadline_s=tuple(float(r.deadline_s) for r in p.requests),
            input_bytes=tuple(int(r.input_bytes) for r in p.requests),
            release_s=tuple(max(float(r.arrival_s), srv.start_s) for r in p.requests),
            link_gain_hz=tuple(float(r.link_gain_hz) for r in p.requests),
            fits=tuple(s <= srv.memory_budget_bytes for s in sizes),
            switch_s=tuple(tuple(x / v for x in row) for row in rows_b),
            switch_bytes=tuple(tuple(row) for row in rows_b),
            overlap_ok=tuple(tuple(row) for row in overlap),
            start_s=float(srv.start_s),
            policy=p.uplink.policy,
            rate_model=p.uplink.rate_model,
            uplink_budget=p.uplink.total_rate_bytes_per_s if linear else p.uplink.total_bandwidth_hz,
            clusters=clusters,
        )

    def uplink_share(self, k: int, window_s: float) -> float:
        """Static share request k needs to upload within ``window_s`` (bytes/s or Hz)."""
        rate = bw.linear_min_rate_bytes_per_s(self.input_bytes[k], window_s)
        if self.rate_model == "linear" or rate == 0 or math.isinf(rate):
            return rate
        return bw.shannon_min_bandwidth_hz(rate * bw.BITS_PER_BYTE, self.link_gain_hz[k])


