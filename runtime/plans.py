"""Durable plans: what the coordinator deployed, kept on disk, and the repairs that make the cluster match it.

A :class:`PlanRecord` is one model's deployed plan: its stages (each on one or more
workers, the replicas), the link spec of every cut, each worker's data endpoint and the
plan id. Every DEPLOY the plan needs is derived from it (:meth:`PlanRecord.deploy_body`),
so the coordinator can send a returning worker exactly what it had before.

:class:`PlanStore` keeps one JSON file per model under ``<store>/plans/``, written
atomically (temporary file, fsync, ``os.replace``) and read back validated; a file that
does not read back is logged with its name and skipped, never fatal.

:func:`reconcile` is the pure decision the coordinator takes for each kept plan whenever
workers come, go or report: re-plan stages that lost every replica, re-apply the plan
under a new id when a worker's endpoint changed, re-send a worker its stages, undeploy
a worker that hosts stages it should not.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from edgesplit.partitioner.store import atomic_write

from . import protocol as P
from .errors import DeployError, ProtocolError
from .links import LinkSpec
from .plan import PlannedHop, check_hops, replace_lost
from .types import StageInfo

log = logging.getLogger("edgesplit.coordinator.plans")

PLAN_FORMAT = 1  # bump on an incompatible change of the file layout
PLANS_DIR = "plans"  # under the coordinator's store
WORKER_KEYS_FILE = "worker-keys.bound"  # keyed clusters: which key each worker name belongs to (JSON)


@dataclass(frozen=True)
class PlanRecord:
    """A model's deployed plan, enough to deploy it again on any worker that returns.

    Attributes:
        model: the model's name.
        plan: the plan id every stage of it carries (requests name it in ``pln``).
        n_blocks: the model's block count.
        hops: the stages, each on its replicas.
        links: the link spec of each cut (``len(hops) - 1``).
        endpoints: each named worker's data endpoint when the plan was (re)applied; the
            stage before lists them in ``StageInfo.next``.
        replicas: replicas per stage that were asked for (informational; ``hops`` rules).
    """

    model: str
    plan: int
    n_blocks: int
    hops: tuple[PlannedHop, ...]
    links: tuple[LinkSpec, ...] = ()
    endpoints: Mapping[str, str] = field(default_factory=dict)
    replicas: int = 1

    def __post_init__(self) -> None:
        P.check_model_name(self.model)
        check_hops(self.hops, self.n_blocks, self.model)
        if len(self.links) != len(self.hops) - 1:
            raise DeployError(f"plan {self.plan} of {self.model}: {len(self.hops)} stages need "
                              f"{len(self.hops) - 1} link specs, got {len(self.links)}")
        missing = [w for w in self.workers if w not in self.endpoints]
        if missing:
            raise DeployError(f"plan {self.plan} of {self.model}: no endpoint for workers {missing}")
        for ep in self.endpoints.values():
            P.check_endpoint(ep)

    @property
    def workers(self) -> list[str]:
        """Every worker the plan names, in stage order, once each."""
        return list(dict.fromkeys(w for h in self.hops for w in h.workers))

    def assignments(self) -> dict[str, list[tuple[StageInfo, LinkSpec, LinkSpec]]]:
        """Per worker: its stages with the link specs on their input and output side."""
        cuts = [LinkSpec(), *self.links, LinkSpec()]  # the client's links at both ends stay raw
        out: dict[str, list[tuple[StageInfo, LinkSpec, LinkSpec]]] = {}
        for k, h in enumerate(self.hops):
            nxt = tuple(self.endpoints[w] for w in self.hops[k + 1].workers) if k + 1 < len(self.hops) else ()
            info = StageInfo(self.model, k, h.start, h.end, self.n_blocks, self.plan, nxt)
            for w in h.workers:
                out.setdefault(w, []).append((info, cuts[k], cuts[k + 1]))
        return out

    def stages_of(self, worker: str) -> frozenset[StageInfo]:
        """The stages ``worker`` hosts under this plan (none when it is not named)."""
        return frozenset(info for info, _, _ in self.assignments().get(worker, []))

    def deploy_body(self, worker: str) -> dict[str, Any]:
        """The DEPLOY body for ``worker`` (an empty stage list undeploys the model there)."""
        items = self.assignments().get(worker, [])
        return {"model": self.model, "plan": self.plan, "stages": [i.to_msg() for i, _, _ in items],
                "links_in": [a.to_msg() for _, a, _ in items], "links_out": [b.to_msg() for _, _, b in items]}

    def changed(self, **changes: Any) -> "PlanRecord":
        """A copy with ``changes`` (plan, hops, endpoints, links), validated again."""
        return dataclasses.replace(self, **changes)

    # --- files ---------------------------------------------------------------------------------
    def to_json(self) -> str:
        """The file's text. ``workers`` (each one's DEPLOY body) is derived, kept for people and checked on load."""
        return json.dumps({
            "format": PLAN_FORMAT, "model": self.model, "plan": self.plan, "n_blocks": self.n_blocks,
            "replicas": self.replicas, "hops": [h.to_msg() for h in self.hops],
            "links": [l.to_msg() for l in self.links], "endpoints": dict(sorted(self.endpoints.items())),
            "workers": {w: self.deploy_body(w) for w in self.workers}}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PlanRecord":
        """Parse and validate a plan file; raises ``ValueError`` (or a ``RuntimeFailure``) naming the problem."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a plan file of format {PLAN_FORMAT}")
        ints = {k: data.get(k) for k in ("plan", "n_blocks", "replicas")}
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints.values()):
            raise ValueError(f"plan, n_blocks and replicas must be non-negative integers, got {ints}")
        hops, links, endpoints = data.get("hops"), data.get("links"), data.get("endpoints")
        if not isinstance(hops, list) or not isinstance(links, list) or not isinstance(endpoints, dict):
            raise ValueError("hops and links must be lists and endpoints a map")
        if not isinstance(data.get("model"), str):
            raise ValueError("model must be a name")
        rec = cls(data["model"], ints["plan"], ints["n_blocks"],
                  tuple(PlannedHop.from_msg(h) for h in hops), tuple(LinkSpec.from_msg(l) for l in links),
                  {str(k): v for k, v in endpoints.items()}, ints["replicas"])
        derived = {w: rec.deploy_body(w) for w in rec.workers}
        if "workers" in data and data["workers"] != json.loads(json.dumps(derived)):
            raise ValueError("its per-worker stages disagree with its hops and endpoints (edited by hand?)")
        return rec


class PlanStore:
    """One JSON file per model in ``root``; written atomically, read back validated, corrupt files skipped."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, model: str) -> Path:
        return self.root / f"{P.check_model_name(model)}.json"

    def save(self, rec: PlanRecord) -> None:
        """Write ``rec`` so that a crash leaves the old file or the new one, never half of one."""
        atomic_write(self.path(rec.model), rec.to_json().encode())

    def remove(self, model: str) -> None:
        self.path(model).unlink(missing_ok=True)

    def mark_undeployed(self, model: str, undeployed: bool) -> None:
        """Remember (or forget) that ``model`` was undeployed, across restarts: a worker that comes
        back still hosting it is told to drop it."""
        marker = self.root / f"{P.check_model_name(model)}.undeployed"
        if undeployed:
            atomic_write(marker, b"")
        else:
            marker.unlink(missing_ok=True)

    def worker_keys(self) -> dict[str, str]:
        """Keyed clusters: worker name -> the public key it first registered with (kept across restarts)."""
        path = self.root / WORKER_KEYS_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.error("E: %s is unreadable (%s); worker names are bound to keys afresh", path, e)
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} \
            if isinstance(data, dict) else {}

    def save_worker_keys(self, keys: dict[str, str]) -> None:
        atomic_write(self.root / WORKER_KEYS_FILE, json.dumps(keys, indent=1, sort_keys=True).encode())

    def undeployed(self) -> set[str]:
        """Models undeployed and not deployed since."""
        return {p.name[: -len(".undeployed")] for p in self.root.glob("*.undeployed")}

    def load(self) -> dict[str, PlanRecord]:
        """Every readable plan, by model; unreadable files are logged by name and skipped."""
        out: dict[str, PlanRecord] = {}
        for path in sorted(self.root.glob("*.json")):
            try:
                rec = PlanRecord.from_json(path.read_text())
                if path.name != f"{rec.model}.json":
                    raise ValueError(f"it holds a plan of {rec.model}")
            except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, RecursionError, ProtocolError,
                    DeployError) as e:
                log.warning("W: skipped plan file %s: %s: %s (the model stays undeployed until deployed again)",
                            path, type(e).__name__, e)
                continue
            out[rec.model] = rec
        return out


# --- reconciling -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LiveWorker:
    """What the coordinator knows of a live worker, for :func:`reconcile`."""

    endpoint: str
    stages: frozenset[StageInfo] = frozenset()  # every stage it reports hosting, of any model
    budget_bytes: int = 0  # memory budget (<= 0: unknown, no limit)
    hosted_bytes: int = 0  # bytes of the blocks of its stages
    key: str = ""  # its public key (z85), keyed clusters


@dataclass(frozen=True)
class Repair:
    """What to deploy so the cluster matches a kept plan.

    ``kind``: ``"replan"`` (stages that lost every replica moved to live workers, new plan
    id), ``"reapply"`` (a worker's endpoint changed: the whole plan again under a new id, so
    the stages before it send to the new endpoint), ``"resend"`` (the same plan to workers
    that do not host their stages of it, or host stages they should not).
    ``targets`` get ``record.deploy_body(name)`` (an empty one for a worker the plan does not name).
    """

    kind: str
    record: PlanRecord
    targets: tuple[str, ...]
    why: str


def reconcile(rec: PlanRecord, live: Mapping[str, LiveWorker], new_plan: int, hop_bytes: Sequence[int],
              may_replan: bool = True) -> Repair | None:
    """The repair ``rec`` needs given the live workers, or None when they match it (or nothing can be done).

    Args:
        rec: the kept plan.
        live: the live workers by name.
        new_plan: the id a re-plan or re-apply takes.
        hop_bytes: bytes of blocks of each stage (for the re-plan's memory check).
        may_replan: whether stages whose workers are all absent may move (False right after the
            coordinator started, while workers are still re-registering).
    """
    named = rec.workers
    dead_hops = [k for k, h in enumerate(rec.hops) if not any(w in live for w in h.workers)]
    moved = sorted(w for w in named if w in live and live[w].endpoint != rec.endpoints[w])
    hops = list(rec.hops)
    if dead_hops and may_replan:
        hops = replace_lost(rec.hops, list(live), {w: v.hosted_bytes for w, v in live.items()},
                            {w: v.budget_bytes for w, v in live.items()}, hop_bytes) or hops
    if hops != list(rec.hops) or moved:
        workers = list(dict.fromkeys(w for h in hops for w in h.workers))
        endpoints = {w: live[w].endpoint if w in live else rec.endpoints[w] for w in workers}
        new = rec.changed(plan=new_plan, hops=tuple(hops), endpoints=endpoints)
        hosting = [w for w, v in live.items() if w not in workers and any(s.model == rec.model for s in v.stages)]
        targets = tuple([w for w in workers if w in live] + sorted(hosting))
        if hops != list(rec.hops):
            lost = sorted({w for k in dead_hops for w in rec.hops[k].workers})
            moves = ", ".join(f"stage {k} -> {list(h.workers)}" for k, h in enumerate(hops) if h != rec.hops[k])
            return Repair("replan", new, targets, f"no live worker hosted a stage (lost: {lost}); {moves}")
        return Repair("reapply", new, targets, f"worker(s) {moved} came back at a new endpoint")
    stale = [w for w in named if w in live and
             frozenset(s for s in live[w].stages if s.model == rec.model) != rec.stages_of(w)]
    extra = sorted(w for w, v in live.items() if w not in named and any(s.model == rec.model for s in v.stages))
    if stale or extra:
        why = (f"worker(s) {stale} do not host their stages of plan {rec.plan}" if stale else "") + \
              ("; " if stale and extra else "") + \
              (f"worker(s) {extra} host stages of {rec.model} the plan does not give them" if extra else "")
        return Repair("resend", rec, tuple(stale + extra), why)
    return None
