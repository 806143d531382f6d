"""edgesplit.runtime: transport, worker daemon, coordinator, client, block cache, local cluster.

Names are imported on first use (PEP 562), so ``edgesplit --help`` does not pay for torch::

    from edgesplit.runtime import connect, LocalCluster, Coordinator, CoordinatorConfig
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Client": "client", "ClientConfig": "client", "RequestInfo": "client", "connect": "client",
    "Coordinator": "coordinator", "CoordinatorConfig": "coordinator",
    "Worker": "worker", "WorkerConfig": "worker",
    "LocalCluster": "cluster", "LocalClusterConfig": "cluster",
    "BlockCache": "cache",
    "Route": "types", "RouteHop": "types", "StageInfo": "types", "WorkerInfo": "types", "WorkerState": "types",
    "PlannedStage": "plan", "layerwise_plan": "plan", "balanced_splits": "plan",
    "PlannedHop": "plan", "place_replicas": "plan", "PlanRecord": "plans", "PlanStore": "plans",
    "LinkSpec": "links", "create_link_codec": "links",
    "RuntimeFailure": "errors", "ProtocolError": "errors", "UnknownModel": "errors", "BadInput": "errors",
    "WorkerLost": "errors", "RequestTimeout": "errors", "Overloaded": "errors", "DeployError": "errors",
    "ConfigError": "errors", "Forbidden": "errors", "DeadlineUnmeetable": "errors", "DeadlineMissed": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edgesplit.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
