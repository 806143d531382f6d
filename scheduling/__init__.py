"""Pure scheduling decisions for PartialLoading-style serving: no sockets, no clock (but the DP's injectable cap).

Layout, one job per module:

- ``problem``: models as block sets, requests, server, uplink; ``Compiled`` index view.
- ``timeline``: residency and timing rules, ``evaluate`` (the checker every answer passes).
- ``uplink``: dividing the uplink (closed forms, shared-link EDF); pure arithmetic.
- ``greedy``, ``dp`` (anytime, capped), ``exact`` (test oracle), ``baselines``.
- ``registry``: ``create_scheduler(name, **options)``, ``list_schedulers()``, ``register_scheduler``.
- ``placement``: exact worker/split/codec placement of a layer-wise chain (``plan_placement``, brute-force oracle).

It imports nothing of the runtime package (sockets, daemons); the coordinator imports it.
"""
from .dp import DPConfig, dp_preconditions, dp_state_count, solve_dp
from .errors import BandwidthError, ScheduleError
from .exact import ExactConfig, solve_exact
from .greedy import GREEDY_RULES, GreedyConfig, solve_greedy
from .baselines import solve_edf, solve_fcfs, solve_oblivious, solve_random
from .problem import (TIME_TOL_S, BackboneStructure, Compiled, ModelLibrary, Problem, Request, ServerConfig,
                      UplinkConfig, backbone_structure)
from .registry import create_scheduler, list_schedulers, register_scheduler, solve_auto
from .placement import (CLIENT, CutCodec, HopPlan, Placement, PlacementError, PlacementProblem, StagePlan,
                        WorkerProfile, brute_force_placement, evaluate_placement, plan_placement)
from .schedule import Schedule
from .timeline import JobTiming, Timeline, allocate_static, evaluate, fast_feasible
from . import uplink

__all__ = [
    "BackboneStructure", "BandwidthError", "Compiled", "DPConfig", "ExactConfig", "GREEDY_RULES", "GreedyConfig",
    "JobTiming", "ModelLibrary", "Problem", "Request", "Schedule", "ScheduleError", "ServerConfig", "TIME_TOL_S",
    "Timeline", "UplinkConfig", "allocate_static", "backbone_structure", "create_scheduler", "dp_preconditions",
    "dp_state_count", "evaluate", "fast_feasible", "list_schedulers", "register_scheduler", "solve_auto",
    "solve_dp", "solve_edf", "solve_exact", "solve_fcfs", "solve_greedy", "solve_oblivious", "solve_random",
    "uplink",
]
__all__ += ["CLIENT", "CutCodec", "HopPlan", "Placement", "PlacementError", "PlacementProblem", "StagePlan",
            "WorkerProfile", "brute_force_placement", "evaluate_placement", "plan_placement"]
