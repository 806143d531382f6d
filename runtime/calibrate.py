"""Closing the planner's loop: run a deployed plan, scale each worker's profile by what it showed, plan again.

A profile is taken with the board otherwise idle. Deployed, a stage shares the board's cores,
caches and memory with the other stages, the data plane and whatever else runs there; in
``benchmarks/placement.py`` (3 workers and a client on a 2-core VM) the stages of the
throughput plans ran up to 32 % over their profiled time, and a block timed with one other
process computing took 9-13 % more CPU. :func:`calibrate` runs requests through the deployed
plan, takes each worker's measured over predicted compute (``placement.calibration``), plans
again with the profiles so scaled, deploys the new plan if it differs, runs it and sets its
prediction beside what it measured. ``edgesplit deploy`` does this after every planned deploy
(``--calibrate N`` requests, 0 to skip); ``edgesplit plan --deploy --calibrate`` likewise.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from edgesplit.scheduling.placement import Placement, plan_placement

from .placement import Measurements, calibration, compare, deploy_args

HEARTBEAT_WAIT_S = 1.2  # the next heartbeat carries the workers' stage statistics


def exercise(cl: Any, model: str, batch: int, n: int, objective: str) -> dict[str, float]:
    """Run ``n`` random requests (one at a time for latency, all at once for throughput); measured figures."""
    shape = cl.route(model, refresh=True).input_shape
    x = torch.randn(batch, *shape)
    cl.infer(model, x)  # warm: loads, connections
    lat = []
    t0 = time.perf_counter()
    if objective == "latency":
        for _ in range(n):
            t = time.perf_counter()
            cl.infer(model, x)
            lat.append(1000 * (time.perf_counter() - t))
    else:
        futs = [cl.submit(model, x) for _ in range(n)]
        for f in futs:
            f.result()
    wall = time.perf_counter() - t0
    return {"requests": n, "seconds": wall, "throughput": n * batch / wall,
            **({"latency_ms_p50": statistics.median(lat)} if lat else {})}


def run_and_compare(cl: Any, model: str, placement: Placement, hop_ms: float, n: int,
                    batch: int = 1) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Run ``n`` requests through the deployed ``placement``; its figures, and measured beside predicted."""
    run = exercise(cl, model, batch, n, placement.objective)
    time.sleep(HEARTBEAT_WAIT_S)
    return run, compare(placement, cl.workers(), model, hop_ms)


@dataclass
class Calibrated:
    """What :func:`calibrate` found: per worker its factor, the plan made with them, and how that plan ran."""

    factors: dict[str, float]
    placement: Placement
    replanned: bool  # the plan differs from the one deployed before, and was deployed
    run: dict[str, float]
    compare: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"factors": self.factors, "replanned": self.replanned, "plan": self.placement.to_dict(),
                "run": self.run, "compare": self.compare}


def calibrate(cl: Any, model: str, m: Measurements, placement: Placement, rows: Sequence[dict[str, Any]],
              n: int, batch: int = 1, max_accuracy_cost: float = 0.0,
              workers: Sequence[str] | None = None) -> Calibrated:
    """Plan again from ``m`` scaled by the deployed ``placement``'s measured ``rows``; deploy if it differs; run.

    A worker without a measured stage gets the median factor (``placement.calibration``).
    """
    names = sorted(m.workers) if workers is None else list(workers)
    factors = calibration(rows, names)
    problem = m.scaled(factors).problem(batch, max_accuracy_cost, workers)
    again = plan_placement(problem, placement.objective)
    replanned = deploy_args(again) != deploy_args(placement)
    if replanned:
        stages, links = deploy_args(again)
        cl.deploy(model, stages=stages, links=links)
    cl.placements[model] = again  # the plan deployed now, with the calibrated prediction
    run, rows_again = run_and_compare(cl, model, again, problem.hop_ms, n, batch)
    return Calibrated(factors, again, replanned, run, rows_again)
