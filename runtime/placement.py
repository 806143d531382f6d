"""From measurements to a placement problem, and from a deployed placement to measured-beside-predicted.

The coordinator's MEASURE answer (each worker's block profile on its own device, its links
to the other workers) plus the client's own probes of its links to each worker become a
:class:`~edgesplit.scheduling.placement.PlacementProblem`; the planner there is pure. After
a deploy, :func:`compare` sets what the workers measure (compute per stage, rate per link)
beside what the plan predicted.

Trained codecs enter the problem when the manifest describes them with their cut and
measured points: ``extra["codecs"][name] = {..., "cut": K, "points": [[budget,
bytes_per_sample, accuracy_cost], ...]}``; each point is a candidate at cut K, deployed as
the link spec ``{"codec": name, "budget": budget}``.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from edgesplit.scheduling.placement import CLIENT, CutCodec, Placement, PlacementProblem, WorkerProfile

from .errors import ProtocolError
from .types import WorkerInfo

UNUSABLE_RATE = 1.0  # bytes/s given to a link whose probe failed: no plan uses it while another exists


@dataclass(frozen=True)
class WorkerMeasure:
    """What one worker measured: its block times per batch size, its budget, its links (peer name -> rate, rtt)."""

    name: str
    endpoint: str
    device: str
    slowdown: float
    memory_budget_bytes: int
    profiles: dict[int, list[float]]  # ms per block right after the block before it
    links: dict[str, tuple[float, float]]  # bytes/s (<= 0: probe failed), round trip ms
    first: dict[int, list[float]] = field(default_factory=dict)  # ms per block as a stage's first (after idle)


@dataclass(frozen=True)
class Measurements:
    """A MEASURE answer plus the client's probes: everything the planner weighs."""

    model: str
    block_bytes: list[int]
    act_bytes: list[int]
    input_bytes: int
    workers: dict[str, WorkerMeasure]
    client_links: dict[str, tuple[float, float]] = field(default_factory=dict)  # worker -> (bytes/s, rtt ms)
    codecs: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_msg(cls, body: Any) -> "Measurements":
        """Check and read a MEASURE answer (the coordinator's blob); a worker whose part is malformed goes to
        ``errors`` instead of failing the rest."""
        try:
            endpoints = {str(n): str(v[0]) for n, v in body["endpoints"].items()}
            blocks = [(int(b[0]), int(b[1])) for b in body["blocks"]]
            model, input_bytes = str(body["model"]), int(body["input_bytes"])
            errors = {str(k): str(v) for k, v in (body.get("errors") or {}).items()}
            replies, codecs = dict(body["workers"]), dict(body.get("codecs") or {})
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise ProtocolError(f"bad message: a MEASURE answer lacks or garbles {e}") from None
        names = {ep: n for n, ep in endpoints.items()}
        workers = {}
        for name, r in replies.items():
            try:
                profiles = {int(b): [float(v) for v in ms] for b, ms in r["profiles"]}
                first = {int(b): [float(v) for v in ms] for b, ms in r.get("first") or ()}  # older workers: none
                if any(len(ms) != len(blocks) or not all(math.isfinite(v) and v >= 0 for v in ms)
                       for ms in [*profiles.values(), *first.values()]):
                    raise ValueError(f"a profile is not {len(blocks)} finite times >= 0")
                links = {names[ep]: (float(rate), float(rtt)) for ep, rate, rtt in r["links"] if ep in names}
                workers[name] = WorkerMeasure(name, endpoints.get(name, ""), str(r["device"]), float(r["slowdown"]),
                                              int(r["memory_budget_bytes"]), profiles, links, first)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                errors[str(name)] = f"its measurements are malformed ({type(e).__name__}: {e}); not planned with"
        return cls(model, [b[0] for b in blocks], [b[1] for b in blocks], input_bytes, workers, {}, codecs, errors)

    def hop_ms(self) -> float:
        """The fixed cost of one message on a hop: half the median round trip of an empty probe."""
        rtts = [rtt for w in self.workers.values() for _, rtt in w.links.values() if rtt > 0]
        rtts += [rtt for _, rtt in self.client_links.values() if rtt > 0]
        return statistics.median(rtts) / 2 if rtts else 0.0

    def problem(self, batch: int = 1, max_accuracy_cost: float = 0.0, workers: Sequence[str] | None = None,
                max_stages: int | None = None) -> PlacementProblem:
        """The placement problem over ``workers`` (default: every worker that measured) at ``batch``."""
        names = [w for w in (workers or sorted(self.workers)) if w in self.workers]
        missing = sorted(set(workers or ()) - set(self.workers))
        if missing:
            raise ProtocolError(f"no measurements from workers {missing}: {self.errors}")
        if any(batch not in self.workers[w].profiles for w in names):
            raise ProtocolError(f"workers were not profiled at batch {batch}; measure with that batch size")
        rates: dict[tuple[str, str], float] = {}
        for a in names:
            for b in names:
                if a != b:  # a pair not probed (the worker did not list it) is as unusable as a failed probe
                    rate = self.workers[a].links.get(b, (-1.0, -1.0))[0]
                    rates[(a, b)] = rate if rate > 0 else UNUSABLE_RATE
        for b, (rate, _) in self.client_links.items():
            if b in names:
                rates[(CLIENT, b)] = rate if rate > 0 else UNUSABLE_RATE
        return PlacementProblem(
            block_bytes=tuple(self.block_bytes), act_bytes=tuple(self.act_bytes), input_bytes=self.input_bytes,
            workers=tuple(WorkerProfile(w, tuple(self.workers[w].profiles[batch]), self.workers[w].memory_budget_bytes,
                                        tuple(self.workers[w].first.get(batch, ()))) for w in names),
            link_rate=rates, hop_ms=self.hop_ms(), codecs=tuple(self._codecs()),
            max_accuracy_cost=max_accuracy_cost, batch=batch, max_stages=max_stages)

    def unusable(self, src: str, dst: str) -> bool:
        """Whether the link ``src -> dst`` is one whose probe failed (or was never run between two workers)."""
        if src == CLIENT:
            return self.client_links.get(dst, (1.0, 0.0))[0] <= 0
        if dst == CLIENT or src not in self.workers:
            return False  # results to the client are not probed
        return self.workers[src].links.get(dst, (-1.0, -1.0))[0] <= 0

    def _codecs(self) -> list[CutCodec]:
        """Codec candidates from the manifest; a malformed description is skipped and named in ``errors``."""
        out = []
        for name, desc in sorted(self.codecs.items()):
            try:
                cut = int(desc["cut"])
                for budget, nbytes, cost in desc["points"]:
                    if 1 <= cut < len(self.block_bytes):
                        out.append(CutCodec(f"{name}@{'full' if budget is None else int(budget)}", cut, int(nbytes),
                                            float(cost)))
            except (KeyError, TypeError, ValueError) as e:
                self.errors[f"codec {name}"] = f"its cut and points ([[budget, bytes, accuracy cost], ...]) are " \
                                               f"malformed ({type(e).__name__}: {e}); not planned with"
        return out

    def scaled(self, factors: dict[str, float]) -> "Measurements":
        """These measurements with each named worker's block times times its factor (see :func:`calibration`)."""
        def times(n: str, per_batch: dict[int, list[float]]) -> dict[int, list[float]]:
            return {b: [v * factors.get(n, 1.0) for v in ms] for b, ms in per_batch.items()}

        workers = {n: replace(w, profiles=times(n, w.profiles), first=times(n, w.first))
                   for n, w in self.workers.items()}
        return replace(self, workers=workers, client_links=dict(self.client_links), errors=dict(self.errors))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "block_bytes": self.block_bytes, "act_bytes": self.act_bytes,
                "input_bytes": self.input_bytes, "hop_ms": self.hop_ms(), "errors": self.errors,
                "client_links": {w: {"rate_bps": r, "rtt_ms": t} for w, (r, t) in self.client_links.items()},
                "workers": {n: {"device": w.device, "slowdown": w.slowdown,
                                "memory_budget_bytes": w.memory_budget_bytes,
                                "profiles": {str(b): ms for b, ms in w.profiles.items()},
                                "first": {str(b): ms for b, ms in w.first.items()},
                                "links": {p: {"rate_bps": r, "rtt_ms": t} for p, (r, t) in w.links.items()}}
                            for n, w in self.workers.items()}}


def deploy_args(placement: Placement) -> tuple[list[tuple[str, int, int]], list[dict[str, Any] | None]]:
    """The ``stages`` and ``links`` of ``Client.deploy`` for a placement (a codec point becomes name + budget)."""
    stages = [(s.worker, s.start, s.end) for s in placement.stages]
    links: list[dict[str, Any] | None] = []
    for hop in placement.hops[1:-1]:
        if hop.codec is None:
            links.append(None)
        else:
            name, _, budget = hop.codec.rpartition("@")
            links.append({"codec": name, "budget": None if budget == "full" else int(budget)})
    return stages, links


def compare(placement: Placement, workers: Sequence[WorkerInfo], model: str,
            hop_ms: float = 0.0) -> list[dict[str, Any]]:
    """Per stage and hop of a deployed placement: predicted ms beside what the workers measure now.

    Stage rows take the worker's median compute for the stage (``None`` until it ran); hop
    rows between stages take the sending worker's link rate to the receiver (to receipt),
    plus the plan's fixed ``hop_ms`` per message.
    """
    info = {w.name: w for w in workers}
    rows: list[dict[str, Any]] = []
    for k, s in enumerate(placement.stages):
        stats = info[s.worker].stage_stats().get((model, k)) if s.worker in info else None
        measured = stats["compute_ms_p50"] if stats and stats["n"] > 0 and stats["compute_ms_p50"] > 0 else None
        rows.append({"what": f"stage {k} on {s.worker} [{s.start}:{s.end})", "predicted_ms": s.compute_ms,
                     "measured_ms": measured, "n": stats["n"] if stats else 0, "worker": s.worker})
    for hop in placement.hops[1:-1]:
        src = info.get(hop.src)
        dst = info.get(hop.dst)
        rate = src.telemetry.get(f"link_rate_bps {dst.endpoint}") if src is not None and dst is not None else None
        measured = hop_ms + 1000.0 * hop.bytes / rate if isinstance(rate, (int, float)) and rate > 0 else None
        rows.append({"what": f"hop {hop.src}->{hop.dst} ({hop.bytes} B{', ' + hop.codec if hop.codec else ''})",
                     "predicted_ms": hop.transfer_ms, "measured_ms": measured, "n": None})
    for r in rows:
        p, m = r["predicted_ms"], r["measured_ms"]
        r["error"] = (m - p) / p if m is not None and p > 0 and math.isfinite(p) else None
    return rows


CALIBRATION_MIN_RUNS = 5  # a stage that ran fewer times than this says nothing about its worker
CALIBRATION_RANGE = (0.25, 4.0)  # a factor outside this is a fault to look at, not a calibration


def calibration(rows: Sequence[dict[str, Any]], workers: Sequence[str] = ()) -> dict[str, float]:
    """Per worker, its stages' measured compute over predicted (rows of :func:`compare` after a run).

    A profile times blocks with nothing else running; a deployed stage shares the board's
    cores, caches and memory with the other stages, the data plane and whatever else runs
    there. In one run of ``benchmarks/placement.py`` (2-core VM) the plans bound by compute
    ran at a median 0.70-0.79x of their predicted throughput, those bound by the
    rate-limited link at 1.00x. The factor carries what the workers showed under load over
    to the next plan: ``measurements.scaled(calibration(rows, workers))``. A worker of
    ``workers`` without a measured stage gets the median factor of those with one: what
    slowed them (a shared machine, a warm room) likely slows it too, and left at 1 it would
    look faster than it is beside them (in one run of the benchmark that drew a latency
    plan onto the unmeasured worker, which measured 0.88x the best enumerated plan).
    """
    ratios: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get("worker") and r["measured_ms"] is not None and r["n"] >= CALIBRATION_MIN_RUNS \
                and r["predicted_ms"] > 0 and math.isfinite(r["predicted_ms"]):
            ratios.setdefault(r["worker"], []).append((r["measured_ms"], r["predicted_ms"]))
    lo, hi = CALIBRATION_RANGE
    factors = {w: min(hi, max(lo, sum(m for m, _ in v) / sum(p for _, p in v))) for w, v in ratios.items()}
    if factors:
        typical = statistics.median(factors.values())
        factors.update({w: typical for w in workers if w not in factors})
    return factors
