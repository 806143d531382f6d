"""A bandwidth-limited link for tests: a network namespace, a veth pair, and a token bucket (tc tbf) into it.

Needs root, ``ip netns`` and ``tc`` (``skip_reason`` says what is missing). Traffic goes only to
the two addresses made here, ``10.<net>.<subnet>.1`` (this namespace) and ``.2`` (the new one).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from typing import Iterator, Sequence

import pytest


def sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=20)


def skip_reason(tag: str) -> str | None:
    """Why a namespace test bed cannot be built here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root for ip netns / tc"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs the ip and tc commands (iproute2)"
    probe = sh("ip", "netns", "add", f"{tag}probe")
    if probe.returncode != 0:
        return f"ip netns does not work here: {probe.stderr.strip()[:200]}"
    sh("ip", "netns", "del", f"{tag}probe")
    return None


class LinkBedUnavailable(RuntimeError):
    """The test bed cannot be built here (the message says why)."""


@contextlib.contextmanager
def netns_link(tag: str, net: int, rate_bytes_per_s: int, burst_bytes: int) -> Iterator[tuple[str, str, str]]:
    """(near address, far address, namespace): everything sent towards the far end passes the token bucket.

    ``tag`` names the namespace and interfaces (unique per process); ``net`` is the second
    octet of the addresses (one per test module or benchmark, so parallel runs do not
    collide). Raises ``LinkBedUnavailable`` when the bed cannot be built; always removes
    what it made. Benchmarks use this directly; tests use :func:`limited_link`.
    """
    reason = skip_reason(tag)
    if reason:
        raise LinkBedUnavailable(reason)
    subnet = 10 + os.getpid() % 200
    ns, near_if, far_if = f"{tag}ns", f"{tag}a", f"{tag}b"
    near, far = f"10.{net}.{subnet}.1", f"10.{net}.{subnet}.2"
    steps = [
        ("ip", "netns", "add", ns),
        ("ip", "link", "add", near_if, "type", "veth", "peer", "name", far_if),
        ("ip", "link", "set", far_if, "netns", ns),
        ("ip", "addr", "add", f"{near}/24", "dev", near_if),
        ("ip", "link", "set", near_if, "up"),
        ("ip", "netns", "exec", ns, "ip", "addr", "add", f"{far}/24", "dev", far_if),
        ("ip", "netns", "exec", ns, "ip", "link", "set", far_if, "up"),
        ("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"),
        ("tc", "qdisc", "add", "dev", near_if, "root", "tbf", "rate", f"{rate_bytes_per_s * 8}bit",
         "burst", str(burst_bytes), "latency", "400ms"),
    ]
    try:
        for step in steps:
            r = sh(*step)
            if r.returncode != 0:
                raise LinkBedUnavailable(f"could not build the test link ({' '.join(step)}): {r.stderr.strip()[:200]}")
        yield near, far, ns
    finally:
        sh("ip", "link", "del", near_if)
        sh("ip", "netns", "del", ns)


@contextlib.contextmanager
def limited_link(tag: str, net: int, rate_bytes_per_s: int, burst_bytes: int) -> Iterator[tuple[str, str, str]]:
    """:func:`netns_link` for tests: skips the test with the reason when the bed cannot be built."""
    try:
        bed = netns_link(tag, net, rate_bytes_per_s, burst_bytes)
        link = bed.__enter__()
    except LinkBedUnavailable as e:
        pytest.skip(str(e))
    try:
        yield link
    finally:
        bed.__exit__(None, None, None)


@contextlib.contextmanager
def far_worker(ns: str, coordinator: str, address: str, store: str | os.PathLike[str], args: Sequence[str] = (),
               log: str | os.PathLike[str] | None = None, name: str = "far") -> Iterator[subprocess.Popen]:
    """A worker daemon inside namespace ``ns``, bound to ``address`` (any port), named ``name``.

    ``args``: more worker flags (``--keys DIR`` or ``--insecure``: the address is not loopback).
    Its output goes to ``log`` (default: ``<store>.log``). Stopped on exit (killed after 10 s).
    """
    env = {**os.environ, "EDGESPLIT_PARENT_PID": str(os.getpid())}
    with open(log or f"{store}.log", "wb") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "edgesplit.runtime.cli", "worker", "--coordinator",
             coordinator, "--bind", f"tcp://{address}:*", "--name", name, "--store", str(store),
             "--torch-threads", "1", *args], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
