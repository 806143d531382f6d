"""Endpoint checks for flags and config fields, before anything binds or connects.

ZeroMQ takes ``127.0.0.1:5555`` or ``tcp://host`` without complaint at connect time and then
never delivers, so the user saw "client is closed" or a thread's traceback. Here such a
value fails at once with a :class:`~edgesplit.partitioner.errors.UsageError` that names the
flag and gives a correct example.
"""
from __future__ import annotations

import re
from dataclasses import fields
from typing import Any

from edgesplit.partitioner.errors import UsageError

SCHEMES = ("tcp://", "ipc://", "inproc://")
_HOST = re.compile(r"[A-Za-z0-9.\-\[\]:*]{1,200}")  # what the wire decoder accepts in a tcp endpoint's host
BIND_FIELDS = ("bind",)  # config fields that are bound: '*' as host or port is allowed there
CONNECT_FIELDS = ("coordinator", "advertise")  # config fields that are connected to (or handed to peers)
METRICS_FIELDS = ("metrics_bind",)  # HOST:PORT fields (HTTP), empty = off


def check_endpoint(text: Any, flag: str, bind: bool = False) -> str:
    """``text`` if it is a ZeroMQ endpoint a daemon or client can use; else a UsageError naming ``flag``.

    Args:
        text: the value given, e.g. ``tcp://10.0.0.1:5555``.
        flag: how the user gave it, e.g. ``--coordinator`` (named in the message).
        bind: an endpoint to bind: ``*`` may stand for the host (every interface) or the port (any free one).
    Returns:
        ``text`` unchanged.
    """
    example = "tcp://*:5555" if bind else "tcp://10.0.0.1:5555"
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{flag} needs an endpoint, e.g. {flag} {example}")
    if text != text.strip():
        raise UsageError(f"{flag} {text!r} has surrounding spaces; e.g. {flag} {example}")
    if not text.startswith(SCHEMES):
        if "://" in text:
            raise UsageError(f"{flag} {text}: unknown scheme {text.split('://')[0]!r}; use tcp:// "
                             f"(e.g. {flag} {example}), ipc:// or inproc://")
        if re.fullmatch(r"[^:/\s]+:[0-9*]+", text):
            hint = f"tcp://{text}"
        elif _HOST.fullmatch(text) and ":" not in text:
            hint = f"tcp://{text}:5555"
        else:
            hint = example
        raise UsageError(f"{flag} {text} is not an endpoint: it needs the tcp:// scheme, e.g. {flag} {hint}")
    if not text.startswith("tcp://"):
        if text.endswith("://"):
            raise UsageError(f"{flag} {text} names no path, e.g. {flag} ipc:///tmp/edgesplit.sock")
        return text
    rest = text[len("tcp://"):]
    if "/" in rest:
        base = text[:len("tcp://")] + rest.split("/", 1)[0]
        raise UsageError(f"{flag} {text}: a tcp endpoint takes no path, only HOST:PORT, e.g. {flag} {base}")
    host, port = _split_host_port(text, rest, flag, example)
    if not _HOST.fullmatch(host):
        raise UsageError(f"{flag} {text}: {host!r} is not a host name or address, e.g. {flag} {example}")
    if port == "*" or host == "*":
        if not bind:
            raise UsageError(f"{flag} {text}: '*' only makes sense where a daemon binds; give the host and port "
                             f"to connect to, e.g. {flag} {example}")
        if port == "*":
            return text
    lowest = 0 if bind else 1  # binding port 0 picks a free port, as '*' does
    if not port.isdigit() or not lowest <= int(port) < 65536:
        raise UsageError(f"{flag} {text}: port {port!r} is not {lowest}-65535"
                         + (" or '*'" if bind else "") + f", e.g. {flag} {example}")
    return text


def _split_host_port(text: str, rest: str, flag: str, example: str) -> tuple[str, str]:
    """``rest`` (after ``tcp://``) as host and port; ``[v6]`` brackets must balance and wrap the whole host."""
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0 or "[" in rest[1:] or "]" in rest[close + 1:]:
            raise UsageError(f"{flag} {text}: unbalanced brackets; an IPv6 host is written whole in [], "
                             f"e.g. {flag} tcp://[::1]:5555")
        host, after = rest[:close + 1], rest[close + 1:]
        if not after.startswith(":") or len(after) == 1:
            raise UsageError(f"{flag} {text} has no port, e.g. {flag} tcp://{host}:5555")
        return host, after[1:]
    if "[" in rest or "]" in rest:
        raise UsageError(f"{flag} {text}: unbalanced brackets; an IPv6 host is written whole in [], "
                         f"e.g. {flag} tcp://[::1]:5555")
    host, colon, port = rest.rpartition(":")
    if colon and not host and port:
        any_host = "*" if "*" in example else "10.0.0.1"
        raise UsageError(f"{flag} {text} has no host, e.g. {flag} tcp://{any_host}:{port}")
    if not colon or not host or not port or host.endswith(":"):  # tcp://::1 is ambiguous: say tcp://[::1]:PORT
        raise UsageError(f"{flag} {text} has no port, e.g. {flag} tcp://{rest.rstrip(':') or 'HOST'}:5555")
    return host, port


def check_metrics_bind(text: Any, flag: str = "--metrics-bind") -> str:
    """``text`` if it is ``HOST:PORT`` (``:9464`` = every address, ``[::1]:9464``) or empty (off); else a UsageError.

    The metrics endpoint is HTTP, not ZeroMQ: no scheme. Checked before the coordinator creates
    its store or binds anything, so a typo costs nothing.
    """
    if text == "":
        return text
    example = f"e.g. {flag} 0.0.0.0:9464 (or :9464 for every address)"
    if not isinstance(text, str) or text != text.strip():
        raise UsageError(f"{flag} takes HOST:PORT, {example}; got {text!r}")
    if "://" in text or "/" in text:
        raise UsageError(f"{flag} {text}: it takes HOST:PORT without a scheme or path, {example}")
    host, colon, port = text.rpartition(":")
    if host.startswith("[") != host.endswith("]") or host.count("[") > 1 or host.count("]") > 1:
        raise UsageError(f"{flag} {text}: unbalanced brackets, e.g. {flag} [::1]:9464")
    if not colon:
        raise UsageError(f"{flag} {text} is not HOST:PORT, {example}")
    if (host and not _HOST.fullmatch(host)) or "*" in host:
        raise UsageError(f"{flag} {text}: {host!r} is not a host name or address, {example}")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"{flag} {text}: port {port!r} is not 0-65535, {example}")
    return text


def check_config_endpoints(cfg: Any) -> Any:
    """Check every endpoint field of a component's config dataclass (flags named as on the command line)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in METRICS_FIELDS:
            check_metrics_bind(value, "--" + f.name.replace("_", "-"))
        if value is None or f.name not in BIND_FIELDS + CONNECT_FIELDS:
            continue
        check_endpoint(value, "--" + f.name.replace("_", "-"), bind=f.name in BIND_FIELDS)
    return cfg
