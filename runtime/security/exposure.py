"""Safe by default: an open (keyless) socket is bound only to loopback, unless the operator insists.

Loopback serves the demo, the tests and ``edgesplit up``. Anything else without keys would
let anyone who reaches the port deploy models, read weights and forge results, so it is
refused with a message saying how to make keys; ``--insecure`` overrides, and the daemon
then says so in its log every minute.
"""
from __future__ import annotations

import ipaddress
import logging
import time

from ..errors import ConfigError

log = logging.getLogger("edgesplit.security")
NAG_EVERY_S = 60.0


def is_loopback(endpoint: str) -> bool:
    """Whether ``endpoint`` is reachable from this machine only (127.0.0.0/8, ::1, localhost, ipc, inproc)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name (or *): it may resolve to anything
        return False


def check_exposure(what: str, endpoint: str, keyed: bool, insecure: bool) -> None:
    """Refuse to bind ``endpoint`` open beyond loopback (``what`` names the socket in the message)."""
    if keyed or is_loopback(endpoint):
        return
    if insecure:
        log.warning("W: INSECURE: %s binds %s without keys (--insecure): anyone who can reach it may deploy, "
                    "read weights and forge results", what, endpoint)
        return
    raise ConfigError(
        f"{what} would bind {endpoint} without keys: anyone who can reach it could deploy models, read weights and "
        "forge results. Make keys (`edgesplit keygen --role coordinator --out keys/`, one per worker, operator and "
        "user; see README 'Security') and pass --keys DIR, or bind 127.0.0.1 on one machine, or pass --insecure on "
        "a network you trust")


class InsecureNag:
    """Logs the insecure-mode warning once a minute from a daemon's loop (``tick`` is cheap)."""

    def __init__(self, what: str, endpoint: str, active: bool) -> None:
        self.what, self.endpoint, self.active = what, endpoint, active
        self._next = time.monotonic() + NAG_EVERY_S

    def tick(self, now: float) -> None:
        if self.active and now >= self._next:
            self._next = now + NAG_EVERY_S
            log.warning("W: INSECURE: %s serves %s without keys (--insecure)", self.what, self.endpoint)
