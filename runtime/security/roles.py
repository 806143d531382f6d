"""What each role may do: which sockets it may connect to, and which messages the coordinator takes from it.

Pure tables, so a reviewer reads the whole policy in one place. The route checks (a RUN for
hop k > 0 only from the plan's hop k-1 workers; a RESULT only from the route's last hop)
need the live plan and sit where plans are known: the worker's data plane and the client.
"""
from __future__ import annotations

from ..protocol import Msg

CONTROL = "control"  # the coordinator's socket
DATA = "data"  # a worker's data socket
RESULTS = "results"  # a client's result socket

RUNNERS = frozenset({"user", "operator"})  # may ask routes and run requests (hop 0)

# who may connect to each kind of socket (the ZAP allow-list)
CONNECT: dict[str, frozenset[str]] = {
    CONTROL: frozenset({"worker", "operator", "user"}),
    DATA: frozenset({"worker"}) | RUNNERS,
    RESULTS: frozenset({"worker"}),
}

_ASK = frozenset({Msg.HELLO, Msg.ROUTE, Msg.ADMIT, Msg.DONE})
# what the coordinator takes from each role; a worker's LINK and PREFETCH are its replies to orders. The
# registry (WORKERS: every name, endpoint, host and pid) and the store's list (MODELS) are the operator's
COORDINATOR_TAKES: dict[str, frozenset[Msg]] = {
    "worker": frozenset({Msg.READY, Msg.HEARTBEAT, Msg.DEPLOYED, Msg.ERROR, Msg.FETCH, Msg.LINK, Msg.PREFETCH,
                         Msg.MEASURE}),
    "operator": _ASK | {Msg.WORKERS, Msg.MODELS, Msg.PLAN, Msg.LINK, Msg.PREFETCH, Msg.UNDEPLOY, Msg.MEASURE},
    "user": _ASK,
}


def coordinator_takes(role: str, t: Msg) -> bool:
    return t in COORDINATOR_TAKES.get(role, frozenset())
