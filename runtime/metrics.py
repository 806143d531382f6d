"""Prometheus ``/metrics`` for the coordinator: the cluster as its heartbeats describe it.

Off unless ``--metrics-bind HOST:PORT`` (e.g. ``0.0.0.0:9464``)::

    edgesplit coordinator --store ./store --metrics-bind 0.0.0.0:9464
    curl -s localhost:9464/metrics | grep ^edgesplit_

The coordinator loop only hands each worker's latest report to :class:`ClusterMetrics`
(one dict assignment under a lock; the reports are fresh objects per heartbeat, never
mutated after); a scrape, on the HTTP server's own thread, takes those references under
the lock and builds the metric families from them, so the loop never waits for a scrape.
Its own ``CollectorRegistry``: several coordinators in one process (tests) never share one.
The endpoint is plain HTTP without authentication, also in a keyed cluster: it shows worker
names, endpoints, model names and figures (never weights or inputs), so bind it to loopback
or a management network.

What workers count is cumulative since each worker process started (a restarted worker
starts from zero again: a counter reset, which ``rate()`` handles). Families:

- ``edgesplit_requests_total{worker,model,outcome}``: how requests ended at a worker: ``result``
  (last stage), ``forwarded`` (sent to the next stage), ``deadline_dropped`` (dropped unrun,
  its deadline passed or could not be met), ``timeout`` (an output the next stage never
  acknowledged in time), ``overloaded`` (refused, input queue full), or the error the worker
  reported to the requester (``bad_input``, ``worker_lost``, ``not_deployed``, ...);
- ``edgesplit_stage_compute_seconds{worker,model,hop}`` (histogram; buckets
  ``COMPUTE_BUCKETS_MS``), ``..._p50_seconds``, ``edgesplit_stage_errors_total``;
- ``edgesplit_request_latency_seconds{model}`` (histogram) and
  ``edgesplit_scheduled_requests_total{model,deadline}``: requests submitted with a deadline,
  from the coordinator's receipt of their ADMIT to its receipt of the client's DONE (one
  clock; includes admission wait, upload, every stage and the result's trip back). Requests
  without a deadline never pass the coordinator, so their end-to-end latency is not here;
- ``edgesplit_link_sent_bytes_total`` / ``..._messages_total{worker,endpoint,peer}`` (payload
  bytes to next stages, resends included) and ``edgesplit_link_rate_bytes_per_second`` (the
  sender's measured rate, once a transfer of 16 KiB or more was acknowledged);
- ``edgesplit_cache_*``: block cache hits, misses, bytes and seconds loading, evictions, load
  rate, resident and budget bytes;
- ``edgesplit_worker_*``: up, state, seconds since last heard, CPU, memory, open fds, GPU
  memory, queue, ``temperature_celsius{zone}`` and ``power_watts{rail}`` on Jetson boards,
  ``events_total{event}`` (the workers' own counters);
- ``edgesplit_admission_total{decision}``: the admission's counts.
"""
from __future__ import annotations

import bisect
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .errors import ConfigError
from .worker.stage import COMPUTE_BUCKETS_MS

log = logging.getLogger("edgesplit.metrics")

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MAX_LOST_KEPT = 256  # lost workers still shown (up 0) before the oldest is forgotten
MAX_LATENCY_MODELS = 256  # models with an end-to-end histogram

# telemetry key -> (metric name, help); what is not here is mapped by prefix below or left out
_GAUGES = {
    "cpu_percent": ("edgesplit_worker_cpu_percent", "Host CPU use, percent of all cores."),
    "proc_cpu_percent": ("edgesplit_worker_process_cpu_percent", "The worker process's CPU use, percent of a core."),
    "proc_rss_bytes": ("edgesplit_worker_resident_memory_bytes", "The worker process's resident set size."),
    "mem_available_bytes": ("edgesplit_worker_memory_available_bytes", "Host memory available."),
    "mem_total_bytes": ("edgesplit_worker_memory_total_bytes", "Host memory in all."),
    "load_1m": ("edgesplit_worker_load1", "Host load average over 1 minute."),
    "open_fds": ("edgesplit_worker_open_fds", "File descriptors the worker process holds."),
    "gpu_free_bytes": ("edgesplit_worker_gpu_memory_free_bytes", "Accelerator memory free."),
    "gpu_total_bytes": ("edgesplit_worker_gpu_memory_total_bytes", "Accelerator memory in all."),
    "gpu_allocated_bytes": ("edgesplit_worker_gpu_memory_allocated_bytes", "Accelerator memory torch holds."),
    "queue": ("edgesplit_worker_queued_requests", "Requests in the worker's input queue."),
    "kept": ("edgesplit_worker_kept_outputs", "Outputs sent on and awaiting the next stage's ACK."),
    "count_peers": ("edgesplit_worker_peer_links", "Data links open to peers (next stages, requesters)."),
    "count_batch_max": ("edgesplit_worker_batch_max", "The largest batch the worker has run."),
    "count_fetch_done_bytes": ("edgesplit_worker_fetch_done_bytes", "Block bytes fetched of the fetch under way."),
    "count_fetch_total_bytes": ("edgesplit_worker_fetch_total_bytes", "Block bytes of the fetch under way."),
}
# cache report key -> (metric name, help, counter?)
_CACHE = {
    "hits": ("edgesplit_cache_hits", "Block lookups found resident.", True),
    "misses": ("edgesplit_cache_misses", "Block lookups that had to load the block.", True),
    "bytes_loaded": ("edgesplit_cache_loaded_bytes", "Bytes of blocks loaded into the cache.", True),
    "load_s": ("edgesplit_cache_load_seconds", "Seconds spent loading blocks (read, check, copy).", True),
    "evictions": ("edgesplit_cache_evictions", "Blocks evicted.", True),
    "bytes_evicted": ("edgesplit_cache_evicted_bytes", "Bytes of blocks evicted.", True),
    "load_bytes_per_s": ("edgesplit_cache_load_rate_bytes_per_second", "Bytes loaded per second of loading.", False),
    "resident_bytes": ("edgesplit_cache_resident_bytes", "Bytes of blocks resident.", False),
    "budget_bytes": ("edgesplit_cache_budget_bytes", "The cache's byte budget.", False),
    "pooled_bytes": ("edgesplit_cache_pooled_bytes", "Evicted blocks' memory kept for the next loads.", False),
    "resident_blocks": ("edgesplit_cache_resident_blocks", "Blocks resident.", False),
}
_STATES = ("live", "deploying", "lost")


@dataclass
class _Worker:
    """What the last heartbeat of one worker said (references to that heartbeat's own objects)."""

    endpoint: str
    state: str = "live"
    seen_at: float = field(default_factory=time.monotonic)
    telemetry: Mapping[str, Any] = field(default_factory=dict)
    stats: Sequence[Any] = ()
    cache: Mapping[str, Any] = field(default_factory=dict)
    report: Any = None  # the heartbeat's ``metrics`` body, unchecked until a scrape reads it


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    total: float = 0.0


class ClusterMetrics(Collector):
    """The coordinator's view for Prometheus: written by the coordinator loop, read by scrapes.

    Args:
        admission_counts: the admission's counters (a dict of ints the loop updates; copied at a scrape).
    """

    def __init__(self, admission_counts: Mapping[str, int] | None = None) -> None:
        self._lock = threading.Lock()
        self._workers: dict[str, _Worker] = {}
        self._latency: dict[str, _Histogram] = {}
        self._scheduled: collections.Counter[tuple[str, str]] = collections.Counter()
        self._admission = admission_counts if admission_counts is not None else {}

    # --- written by the coordinator loop ---------------------------------------------------------
    def heartbeat(self, name: str, endpoint: str, telemetry: Mapping[str, Any], stats: Sequence[Any],
                  cache: Mapping[str, Any], report: Any, deploying: bool) -> None:
        """A worker's heartbeat (its checked telemetry, stats and cache, and its raw ``metrics`` body)."""
        seen = _Worker(endpoint, "deploying" if deploying else "live", time.monotonic(), telemetry, stats, cache,
                       report)
        with self._lock:
            self._workers[name] = seen

    def lost(self, name: str) -> None:
        """A worker declared lost: shown as down, its figures gone (they would only go stale)."""
        with self._lock:
            old = self._workers.pop(name, None)
            if old is not None:
                self._workers[name] = _Worker(old.endpoint, "lost", old.seen_at)
            gone = [n for n, w in self._workers.items() if w.state == "lost"]
            for n in gone[:max(0, len(gone) - MAX_LOST_KEPT)]:
                del self._workers[n]

    def done(self, admission: Any, client: bytes, rid: bytes, now: float) -> None:
        """A client's DONE for a scheduled request (read before ``admission.observe`` forgets it)."""
        entry = getattr(admission, "running", {}).get(rid)
        if entry is None or entry[0].ask.client != client:
            return
        ask = entry[0].ask
        seconds = max(0.0, now - ask.arrived)
        with self._lock:
            hist = self._latency.get(ask.model)
            if hist is None:
                if len(self._latency) >= MAX_LATENCY_MODELS:
                    return
                hist = self._latency[ask.model] = _Histogram()
            hist.counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
            hist.total += seconds
            self._scheduled[(ask.model, "met" if now <= ask.deadline else "missed")] += 1

    # --- read by scrapes -------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        now = time.monotonic()
        with self._lock:
            workers = dict(self._workers)
            latency = {m: (list(h.counts), h.total) for m, h in self._latency.items()}
            scheduled = dict(self._scheduled)
        admission = dict(self._admission)  # one C-level copy: the loop's increments are atomic under the GIL
        peers = {w.endpoint: name for name, w in workers.items()}
        fam = CounterMetricFamily("edgesplit_admission", "Requests with a deadline by the admission's decision.",
                                  labels=["decision"])
        for decision, n in sorted(admission.items()):
            if _number(n):
                fam.add_metric([decision], float(n))
        for f in (*_worker_families(workers, now), *_telemetry_families(workers, peers),
                  *_report_families(workers, peers), *_stats_families(workers), *_cache_families(workers),
                  *_latency_families(latency, scheduled), fam):
            yield _first_of_each(f)


def _worker_families(workers: Mapping[str, _Worker], now: float) -> Iterator[Metric]:
    up = GaugeMetricFamily("edgesplit_worker_up", "1 while the worker heartbeats, 0 once declared lost.",
                           labels=["worker"])
    state = GaugeMetricFamily("edgesplit_worker_state", "1 for the worker's current state.", labels=["worker", "state"])
    seen = GaugeMetricFamily("edgesplit_worker_last_seen_seconds", "Seconds since the worker's last heartbeat.",
                             labels=["worker"])
    for name, w in sorted(workers.items()):
        up.add_metric([name], 0.0 if w.state == "lost" else 1.0)
        for s in _STATES:
            state.add_metric([name, s], 1.0 if w.state == s else 0.0)
        seen.add_metric([name], max(0.0, now - w.seen_at))
    yield from (up, state, seen)


def _telemetry_families(workers: Mapping[str, _Worker], peers: Mapping[str, str]) -> Iterator[Metric]:
    gauges = {key: GaugeMetricFamily(name, doc, labels=["worker"]) for key, (name, doc) in _GAUGES.items()}
    temp = GaugeMetricFamily("edgesplit_worker_temperature_celsius", "Thermal zone temperature (Jetson).",
                             labels=["worker", "zone"])
    power = GaugeMetricFamily("edgesplit_worker_power_watts", "INA3221 power rail (Jetson).", labels=["worker", "rail"])
    rate = GaugeMetricFamily("edgesplit_link_rate_bytes_per_second", "The sender's measured rate of a link to a next "
                             "stage.", labels=["worker", "endpoint", "peer"])
    events = CounterMetricFamily("edgesplit_worker_events", "The worker's own counters (received, computed, sent, "
                                 "expired, bad_messages, switches, ...).", labels=["worker", "event"])
    for name, w in sorted(workers.items()):
        for key, v in sorted(w.telemetry.items()):
            if not _number(v):
                continue
            if key in gauges:
                gauges[key].add_metric([name], float(v))
            elif key.startswith("temp_") and key.endswith("_c"):
                temp.add_metric([name, key[5:-2]], float(v))
            elif key.startswith("power_") and key.endswith("_mw"):
                power.add_metric([name, key[6:-3]], float(v) / 1000.0)
            elif key.startswith("link_rate_bps "):
                ep = key.split(" ", 1)[1]
                rate.add_metric([name, ep, peers.get(ep, "")], float(v))
            elif key.startswith("count_") and v >= 0:  # the levels among them are gauges above
                events.add_metric([name, key[6:]], float(v))
    yield from (*gauges.values(), temp, power, rate, events)


def _report_families(workers: Mapping[str, _Worker], peers: Mapping[str, str]) -> Iterator[Metric]:
    """From each heartbeat's ``metrics`` body: outcomes, link bytes, compute histograms (rows checked here)."""
    outcomes = CounterMetricFamily("edgesplit_requests", "Requests by how they ended at this worker.",
                                   labels=["worker", "model", "outcome"])
    sent = CounterMetricFamily("edgesplit_link_sent_bytes", "Payload bytes sent to a next stage (resends included).",
                               labels=["worker", "endpoint", "peer"])
    msgs = CounterMetricFamily("edgesplit_link_sent_messages", "Activations sent to a next stage.",
                               labels=["worker", "endpoint", "peer"])
    compute = HistogramMetricFamily("edgesplit_stage_compute_seconds", "A stage's compute time per request (its "
                                    "batch's decode, forward and encode).", labels=["worker", "model", "hop"])
    bounds = [floatToGoString(b / 1000.0) for b in COMPUTE_BUCKETS_MS] + ["+Inf"]
    for name, w in sorted(workers.items()):
        report = w.report if isinstance(w.report, dict) else {}
        for row in _rows(report.get("outcomes"), 3):
            if isinstance(row[0], str) and isinstance(row[1], str) and _count(row[2]):
                outcomes.add_metric([name, row[0], row[1]], float(row[2]))
        for row in _rows(report.get("links"), 3):
            if isinstance(row[0], str) and _count(row[1]) and _count(row[2]):
                labels = [name, row[0], peers.get(row[0], "")]
                sent.add_metric(labels, float(row[1]))
                msgs.add_metric(labels, float(row[2]))
        for row in _rows(report.get("hist"), 4):
            model, hop, total, counts = row
            if not (isinstance(model, str) and _count(hop) and _number(total) and isinstance(counts, list)
                    and len(counts) == len(bounds) and all(_count(c) for c in counts)):
                continue
            cumulative = [float(sum(counts[:i + 1])) for i in range(len(counts))]
            compute.add_metric([name, model, str(hop)], list(zip(bounds, cumulative)), float(total) / 1000.0)
    yield from (outcomes, sent, msgs, compute)


def _stats_families(workers: Mapping[str, _Worker]) -> Iterator[Metric]:
    """From each heartbeat's ``stats`` rows [model, hop, n, p50 ms, mean ms, errors] (checked by the coordinator)."""
    p50 = GaugeMetricFamily("edgesplit_stage_compute_p50_seconds", "Median of a stage's recent compute times.",
                            labels=["worker", "model", "hop"])
    errors = CounterMetricFamily("edgesplit_stage_errors", "Requests a stage failed on (bad input, load failure).",
                                 labels=["worker", "model", "hop"])
    for name, w in sorted(workers.items()):
        for row in w.stats:
            labels = [name, row[0], str(row[1])]
            p50.add_metric(labels, float(row[3]) / 1000.0)
            errors.add_metric(labels, float(row[5]))
    yield from (p50, errors)


def _cache_families(workers: Mapping[str, _Worker]) -> Iterator[Metric]:
    fams = {key: (CounterMetricFamily if is_counter else GaugeMetricFamily)(name, doc, labels=["worker"])
            for key, (name, doc, is_counter) in _CACHE.items()}
    for name, w in sorted(workers.items()):
        for key, fam in fams.items():
            v = w.cache.get(key)
            if _number(v) and v >= 0:
                fam.add_metric([name], float(v))
    yield from fams.values()


def _latency_families(latency: Mapping[str, tuple[list[int], float]],
                      scheduled: Mapping[tuple[str, str], int]) -> Iterator[Metric]:
    hist = HistogramMetricFamily("edgesplit_request_latency_seconds", "Requests with a deadline: the coordinator's "
                                 "receipt of ADMIT to its receipt of the client's DONE.", labels=["model"])
    bounds = [floatToGoString(b) for b in LATENCY_BUCKETS_S] + ["+Inf"]
    for model, (counts, total) in sorted(latency.items()):
        cumulative = [float(sum(counts[:i + 1])) for i in range(len(counts))]
        hist.add_metric([model], list(zip(bounds, cumulative)), total)
    done = CounterMetricFamily("edgesplit_scheduled_requests", "Requests with a deadline whose result came, by "
                               "whether it came by the deadline.", labels=["model", "deadline"])
    for (model, met), n in sorted(scheduled.items()):
        done.add_metric([model, met], float(n))
    yield from (hist, done)


def _first_of_each(fam: Metric) -> Metric:
    """``fam`` without repeated series (a worker reporting one row twice would make the whole scrape invalid)."""
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    keep = []
    for s in fam.samples:
        key = (s.name, tuple(sorted(s.labels.items())))
        if key not in seen:
            seen.add(key)
            keep.append(s)
    fam.samples = keep
    return fam


def _rows(v: Any, width: int) -> Iterable[list[Any]]:
    return [r for r in v if isinstance(r, list) and len(r) == width] if isinstance(v, list) else []


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class MetricsServer:
    """``/metrics`` over HTTP on its own thread, from a registry holding only ``metrics``."""

    def __init__(self, bind: str, metrics: ClusterMetrics) -> None:
        host, port = parse_bind(bind)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(metrics)
        try:
            self._server, self._thread = start_http_server(port, host, self.registry)
        except OSError as e:
            raise ConfigError(f"cannot serve metrics on {bind}: {e}; pick another --metrics-bind") from None
        self.host, self.port = host, int(self._server.server_address[1])
        log.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def parse_bind(bind: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464``, ``:9464`` = every address) as (host, port)."""
    host, sep, port = bind.strip().rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--metrics-bind must be HOST:PORT (e.g. 0.0.0.0:9464), got {bind!r}")
    return host, int(port)
