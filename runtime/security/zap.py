"""CURVE on a component's sockets, and the ZAP handler that admits only listed keys of allowed roles.

Each component (coordinator, worker, client) has one ``Security`` for its private context.
A bound socket serves one *domain* (``roles.CONTROL``, ``DATA``, ``RESULTS``); the ZAP
thread admits a connecting key only if the key directory lists it under a role that domain
allows. A refused peer's handshake fails before any message is read: it learns nothing,
not even which messages exist. Past the handshake every message carries the sender's key
(ZAP ``User-Id``), which :meth:`Security.peer_of` turns into a ``Peer`` for the
per-message checks (role per message type, route position per hop).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import zmq
from zmq.auth.thread import ThreadAuthenticator

from ..errors import ConfigError
from .keys import KeyRing, Peer

log = logging.getLogger("edgesplit.security")


class _AllowList:
    """The ZAP callback for one domain: keys listed under one of ``roles``."""

    def __init__(self, keys: KeyRing, domain: str, roles: frozenset[str]) -> None:
        self.keys, self.domain, self.roles = keys, domain, roles
        self.refused = 0

    def callback(self, domain: str, key: bytes | str) -> bool:
        k = key.decode() if isinstance(key, bytes) else key
        peer = self.keys.peer(k)
        if peer is not None and peer.role in self.roles:
            return True
        self.refused += 1
        if self.refused <= 10 or self.refused % 1000 == 0:
            log.warning("refused a %s connection: key %s… is %s (refused %d so far)", self.domain, k[:8],
                        f"a {peer.role} key, not one of {sorted(self.roles)}" if peer else "not in "
                        f"{self.keys.root}", self.refused)
        return False


class Security:
    """CURVE keys and the ZAP allow-list of one component; with ``keys=None`` everything stays open."""

    def __init__(self, ctx: zmq.Context, keys: KeyRing | None, domains: Mapping[str, frozenset[str]] = {}) -> None:
        self.keys = keys
        self._auth: ThreadAuthenticator | None = None
        self._lists: dict[str, _AllowList] = {}
        if keys is None:
            return
        if not zmq.has("curve"):
            raise ConfigError("this libzmq has no CURVE support; install pyzmq's wheel (it bundles libsodium)")
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("edgesplit.security.zap"))
        self._auth.start()
        for domain, roles in domains.items():
            self._lists[domain] = _AllowList(keys, domain, roles)
            self._auth.configure_curve_callback(domain, self._lists[domain])

    @property
    def keyed(self) -> bool:
        return self.keys is not None

    def refused(self) -> int:
        """Connections the ZAP handler refused (unknown keys, or keys of a role the socket does not serve)."""
        return sum(a.refused for a in self._lists.values())

    def serve(self, sock: zmq.Socket, domain: str) -> None:
        """Make ``sock`` (before bind) a CURVE server whose peers the ZAP handler checks against ``domain``."""
        if self.keys is None:
            return
        if domain not in self._lists:
            raise ValueError(f"no allow-list for domain {domain!r}")
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_server = True
        sock.zap_domain = domain.encode()

    def dial(self, sock: zmq.Socket, server_key: bytes | str | None) -> None:
        """Make ``sock`` (before connect) a CURVE client that only talks to the holder of ``server_key``."""
        if self.keys is None:
            return
        if not server_key:
            raise ConfigError("a keyed connection needs the server's public key, and none is known for it")
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_serverkey = server_key.encode() if isinstance(server_key, str) else server_key

    def peer_of(self, frame: Any) -> Peer | None:
        """The authenticated sender of a received frame (None when open, or for a key no longer listed)."""
        if self.keys is None:
            return None
        try:
            return self.keys.peer(frame.get("User-Id"))
        except (zmq.ZMQError, AttributeError, TypeError):
            return None

    def close(self) -> None:
        """Stop the ZAP thread (before the context is destroyed)."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
