"""Routes from what live workers host: pure functions of a kept plan (or of reports) and the live workers.

A route lists, per stage, every live worker that reports hosting it under the plan's id,
in the plan's order (a client spreads requests over them and replays on another when one
is lost). A stage that no live worker serves makes the route raise an error that says why
and what to do: ``WorkerLost`` when its workers are gone, ``UnknownModel`` while it loads.
"""
from __future__ import annotations

from typing import Mapping

from edgesplit.partitioner import ModelManifest

from .errors import NotDeployed, RuntimeFailure, UnknownModel, WorkerLost
from .plan import PlannedHop
from .plans import LiveWorker, PlanRecord
from .types import Route, RouteHop, StageInfo


def route_of_plan(manifest: ModelManifest, rec: PlanRecord, live: Mapping[str, LiveWorker],
                  deploying: bool = False, settling: bool = False) -> Route:
    """The route of a kept plan over the live workers.

    Args:
        manifest: the model as the store has it now.
        rec: its kept plan.
        live: the live workers (endpoint and reported stages).
        deploying: whether a deploy of the model is under way (changes the advice in errors).
        settling: whether the coordinator has just started (absent workers may still register).
    Raises:
        WorkerLost: a stage's workers are all gone.
        UnknownModel: a stage is not loaded yet, its workers have not registered since the
            coordinator started, or the model changed since the plan.
    """
    model = manifest.name
    if rec.n_blocks != manifest.n_blocks:
        raise UnknownModel(f"model {model} has {manifest.n_blocks} blocks in the store but plan {rec.plan} was "
                           f"made for {rec.n_blocks}; deploy it again")
    replicas: list[list[RouteHop]] = []
    for k, h in enumerate(rec.hops):
        hosting = [name for name, w in live.items()
                   if any(s.model == model and s.hop == k and s.plan == rec.plan and (s.start, s.end) == (h.start, h.end)
                          for s in w.stages)]
        if not hosting:
            raise _stage_down(model, rec, k, h, live, deploying, settling)
        hosting.sort(key=lambda n: (h.workers.index(n) if n in h.workers else len(h.workers), n))
        replicas.append([RouteHop(k, n, live[n].endpoint, h.start, h.end, live[n].key) for n in hosting])
    return Route(model, rec.plan, manifest.n_blocks, list(manifest.input_shape), [r[0] for r in replicas], replicas,
                 data_config=manifest.extra.get("data_config"))


def _stage_down(model: str, rec: PlanRecord, k: int, h: PlannedHop, live: Mapping[str, LiveWorker],
                deploying: bool, settling: bool) -> RuntimeFailure:
    """The error for stage ``k`` of a kept plan that no live worker serves."""
    present = [w for w in h.workers if w in live]
    # NotDeployed ("retry shortly") while something is under way: clients keep their replays for it
    if present:
        return NotDeployed(f"model {model}: stage {k} (blocks [{h.start}, {h.end})) of plan {rec.plan} is not "
                            f"loaded on {present} yet (deploying, or the deploy failed: see the coordinator's "
                            "log); retry shortly")
    if settling:
        return NotDeployed(f"model {model}: worker(s) {list(h.workers)} of stage {k} of plan {rec.plan} have not "
                            "registered since the coordinator started; retry shortly")
    if deploying:
        return NotDeployed(f"model {model}: no live worker hosts stage {k} (blocks [{h.start}, {h.end})) of plan "
                           f"{rec.plan}; worker(s) {list(h.workers)} were lost; it is being re-planned onto the "
                           "live workers; retry shortly")
    nxt = ("no live worker could take it (none left, none with room, or --no-replan); start one of them again "
           "(it gets its stages back by itself), start more workers, or deploy the model anew (Client.deploy)")
    return WorkerLost(f"model {model}: no live worker hosts stage {k} (blocks [{h.start}, {h.end})) of plan "
                      f"{rec.plan}; worker(s) {list(h.workers)} were lost; {nxt}")


def route_of_reports(manifest: ModelManifest, live: Mapping[str, LiveWorker],
                     lost: Mapping[tuple[str, int], list[str]]) -> Route:
    """A model without a kept plan (its file is gone): the newest plan the live workers report.

    Args:
        manifest: the model.
        live: the live workers.
        lost: ``(model, plan) -> workers`` lost while hosting it, to name them in errors.
    """
    model = manifest.name
    by_plan: dict[int, dict[int, list[tuple[str, StageInfo]]]] = {}
    for name, w in live.items():
        for s in w.stages:
            if s.model == model:
                by_plan.setdefault(s.plan, {}).setdefault(s.hop, []).append((name, s))
    newest = max(by_plan, default=None)
    gone = [(p, names) for (m, p), names in lost.items() if m == model and (newest is None or p >= newest)]

    def lost_error() -> WorkerLost:
        p, names = max(gone)
        return WorkerLost(f"model {model}: worker(s) {names} hosting plan {p} were lost; redeploy it "
                          "(Client.deploy) on the live workers")

    if newest is None:
        if gone:
            raise lost_error()
        raise UnknownModel(f"model {model} is in the store but deployed on no live worker; deploy it with "
                           "Client.deploy(...) or `edgesplit up --model ...`")
    hops = by_plan[newest]
    replicas, pos = [], 0
    for hop in range(len(hops)):
        if hop not in hops or hops[hop][0][1].start != pos:
            if gone:
                raise lost_error()
            raise NotDeployed(f"model {model} plan {newest} is incomplete (still deploying?); hops {sorted(hops)}")
        replicas.append([RouteHop(hop, name, live[name].endpoint, s.start, s.end, live[name].key)
                         for name, s in sorted(hops[hop], key=lambda x: x[0])])
        pos = hops[hop][0][1].end
    if pos != manifest.n_blocks:
        if gone:
            raise lost_error()
        raise UnknownModel(f"model {model} plan {newest} covers blocks up to {pos} of {manifest.n_blocks}")
    return Route(model, newest, manifest.n_blocks, list(manifest.input_shape), [r[0] for r in replicas], replicas,
                 data_config=manifest.extra.get("data_config"))
