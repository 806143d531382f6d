"""Uplink allocation: who gets how much of the shared uplink (closed forms, shared-link EDF).

PartialLoading (Qu et al., arXiv 2503.22982) schedules first and divides the uplink
second. Once the order is fixed, request k has an *upload window*: from its release
(the later of its arrival and the planning time) to the moment its inference may start
(its due time). Two ways to divide a total uplink among the users:

(a) **Static split** (FDMA-like): user k holds a constant share for the whole window,
    just enough to finish its upload at its due time. Closed forms:

    - fixed spectral efficiency (linear rate): r_k = D_k / w_k bytes/s; feasible iff
      sum_k r_k <= B.
    - Shannon rate per user, b * log2(1 + a/b) bit/s with a = p*g/N0 in Hz: the least
      bandwidth carrying R bit/s is b = a / (y - 1), y = -W_{-1}(-c e^{-c}) / c,
      c = R ln2 / a (W_{-1}: lower branch of Lambert W). It exists iff R < a / ln2,
      the rate as b -> infinity. Derivation: with x = a/b, R = (a/x) log2(1+x) gives
      ln(1+x)/x = c; put y = 1+x: y e^{-cy} = e^{-c}, i.e. (-cy) e^{-cy} = -c e^{-c};
      W_0 gives the trivial root y = 1 (b = infinity), W_{-1} the finite one.

(b) **EDF on one shared link**: the whole rate B serves one upload at a time, the
    released upload with the earliest due time first (preemptive, work-conserving).

**(b) is feasible whenever (a) is (linear rate).** A feasible static split is a fluid
schedule of the link: at every instant the active users' rates sum to at most
sum_k r_k <= B, and each upload is done by its due time. Preemptive EDF on a single
resource meets every due date whenever any preemptive or fluid schedule does
(Dertouzos 1974; Liu & Layland 1973: on one processor EDF is optimal for feasibility
with release times and preemption). Hence EDF finishes every upload by its due time.
``tests/test_scheduling_uplink.py`` checks this on random instances. The converse fails (EDF
can serve windows no static split can), and for the *Shannon* model the implication
fails too: splitting the band raises the sum rate (log is concave), so a time-shared
link can be slower than an FDMA split; the test shows a concrete case.

Pure arithmetic on sequences of numbers: this module knows nothing of problems or
timelines (``timeline.allocate_static`` applies it to a schedule), so the problem model
can use it without an import cycle.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

from .errors import BandwidthError

LN2 = math.log(2.0)
BITS_PER_BYTE = 8
_REL_TOL = 1e-9  # budget comparisons: float sums of shares


def linear_min_rate_bytes_per_s(input_bytes: float, window_s: float) -> float:
    """Least constant rate that moves ``input_bytes`` within ``window_s``.

    Args:
        input_bytes: upload size D (bytes), >= 0.
        window_s: time from release to due time (s).
    Returns:
        D / w in bytes/s; 0 for an empty upload; ``inf`` when the window is not positive.
    """
    if input_bytes < 0:
        raise BandwidthError(f"input_bytes must be >= 0, got {input_bytes}")
    if input_bytes == 0:
        return 0.0
    if window_s <= 0:
        return math.inf
    return input_bytes / window_s


def shannon_rate_bits_per_s(bandwidth_hz: float, link_gain_hz: float) -> float:
    """Shannon rate b * log2(1 + a/b) of a user holding ``bandwidth_hz`` of spectrum.

    Args:
        bandwidth_hz: the user's share b (Hz), >= 0.
        link_gain_hz: a = p*g/N0, received power over noise spectral density (Hz).
    Returns:
        The rate in bit/s (0 for b = 0; a/ln2 in the limit b -> infinity).
    """
    if bandwidth_hz <= 0:
        return 0.0
    if math.isinf(bandwidth_hz):
        return link_gain_hz / LN2
    return bandwidth_hz * math.log1p(link_gain_hz / bandwidth_hz) / LN2


def shannon_max_rate_bits_per_s(link_gain_hz: float) -> float:
    """Rate cap a/ln2 of the Shannon model as the bandwidth grows without bound."""
    return link_gain_hz / LN2


def shannon_min_bandwidth_hz(rate_bits_per_s: float, link_gain_hz: float) -> float:
    """Least bandwidth b with b*log2(1 + a/b) >= R, in closed form (Lambert W, lower branch).

    Args:
        rate_bits_per_s: required rate R (bit/s), >= 0.
        link_gain_hz: a = p*g/N0 (Hz), > 0.
    Returns:
        b in Hz; 0 for R = 0; ``inf`` when R >= a/ln2 (no bandwidth is enough).
    """
    if rate_bits_per_s < 0 or link_gain_hz <= 0:
        raise BandwidthError(f"need rate >= 0 and link gain > 0, got {rate_bits_per_s}, {link_gain_hz}")
    if rate_bits_per_s == 0:
        return 0.0
    if math.isinf(link_gain_hz):  # noiseless link: any bandwidth > 0 suffices
        return 0.0
    c = rate_bits_per_s * LN2 / link_gain_hz
    if c >= 1.0:
        return math.inf
    from scipy.special import lambertw  # here, not at the top: importing scipy costs ~100 MiB

    w = float(lambertw(-c * math.exp(-c), k=-1).real)  # < -1 for 0 < c < 1
    x = -w / c - 1.0  # x = a/b
    if x <= 0:  # c within rounding of 1
        return math.inf
    return link_gain_hz / x


@dataclass(frozen=True)
class StaticSplit:
    """A static division of the uplink: each user's constant share over its window."""

    shares: tuple[float, ...]  # per user, in ``unit``; inf where the window is empty
    total: float  # sum of shares
    budget: float  # what is available (B bytes/s or B Hz)
    unit: str  # "bytes/s" (linear model) or "Hz" (Shannon model)

    @property
    def feasible(self) -> bool:
        return self.total <= self.budget * (1 + _REL_TOL)


def static_split_linear(input_bytes: Sequence[float], window_s: Sequence[float],
                        total_rate_bytes_per_s: float) -> StaticSplit:
    """Static split for a fixed spectral efficiency: r_k = D_k / w_k.

    Args:
        input_bytes: D_k per user (bytes).
        window_s: w_k per user: due time minus release (s).
        total_rate_bytes_per_s: B, the link's total rate.
    Returns:
        The shares in bytes/s and whether they fit in B.
    """
    _same_length(input_bytes, window_s)
    shares = tuple(linear_min_rate_bytes_per_s(d, w) for d, w in zip(input_bytes, window_s))
    return StaticSplit(shares, math.fsum(shares), total_rate_bytes_per_s, "bytes/s")


def static_split_shannon(input_bytes: Sequence[float], window_s: Sequence[float],
                         link_gain_hz: Sequence[float], total_bandwidth_hz: float) -> StaticSplit:
    """Static split for a Shannon rate per user: b_k from the Lambert-W closed form.

    Args:
        input_bytes: D_k per user (bytes).
        window_s: w_k per user (s).
        link_gain_hz: a_k = p_k g_k / N0 per user (Hz).
        total_bandwidth_hz: B, the spectrum to divide (Hz).
    Returns:
        The shares in Hz and whether they fit in B.
    """
    _same_length(input_bytes, window_s)
    _same_length(input_bytes, link_gain_hz)
    shares = []
    for d, w, a in zip(input_bytes, window_s, link_gain_hz):
        rate = linear_min_rate_bytes_per_s(d, w) * BITS_PER_BYTE
        shares.append(0.0 if rate == 0 else math.inf if math.isinf(rate) else shannon_min_bandwidth_hz(rate, a))
    return StaticSplit(tuple(shares), math.fsum(shares), total_bandwidth_hz, "Hz")


def edf_upload_completions(release_s: Sequence[float], input_bytes: Sequence[float],
                           rate_bytes_per_s: float, priority: Sequence[float] | None = None) -> tuple[float, ...]:
    """Completion times of uploads sharing one link, served preemptively by priority.

    The link is work-conserving: whenever some released upload is unfinished, the one
    with the smallest priority value (ties: lower index) gets the whole rate. With
    priority = due time this is EDF; the schedulers pass the service position, which
    orders the due times (each job starts after the previous one).

    Args:
        release_s: when each upload may begin (s).
        input_bytes: each upload's size (bytes).
        rate_bytes_per_s: the link's rate (inf: every upload ends at its release).
        priority: smaller is served first; default the index.
    Returns:
        Each upload's completion time (s), in input order.
    """
    n = len(release_s)
    _same_length(release_s, input_bytes)
    if priority is None:
        priority = range(n)
    _same_length(release_s, priority)
    if rate_bytes_per_s <= 0:
        raise BandwidthError(f"link rate must be > 0 bytes/s, got {rate_bytes_per_s}")
    done = [0.0] * n
    if math.isinf(rate_bytes_per_s):
        return tuple(float(r) for r in release_s)
    by_release = sorted(range(n), key=lambda i: release_s[i])
    remaining = [d / rate_bytes_per_s for d in input_bytes]  # seconds of link time left
    pending: list[tuple[float, int]] = []
    nxt = 0
    t = -math.inf
    while nxt < n or pending:
        if not pending:
            t = max(t, release_s[by_release[nxt]])
        while nxt < n and release_s[by_release[nxt]] <= t:
            i = by_release[nxt]
            nxt += 1
            if remaining[i] == 0.0:  # nothing to send: done at release
                done[i] = release_s[i]
                continue
            heapq.heappush(pending, (priority[i], i))
        if not pending:
            continue
        _, i = pending[0]
        next_release = release_s[by_release[nxt]] if nxt < n else math.inf
        run = min(remaining[i], next_release - t)
        t += run
        remaining[i] -= run
        if remaining[i] <= 0.0:
            heapq.heappop(pending)
            done[i] = t
    return tuple(done)


def edf_meets_due_times(release_s: Sequence[float], input_bytes: Sequence[float], due_s: Sequence[float],
                        rate_bytes_per_s: float, tol_s: float = 1e-9) -> bool:
    """Whether EDF on one link of rate B finishes every upload by its due time."""
    done = edf_upload_completions(release_s, input_bytes, rate_bytes_per_s, priority=due_s)
    return all(c <= d + tol_s for c, d in zip(done, due_s))


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise BandwidthError(f"per-user sequences differ in length: {len(a)} vs {len(b)}; pass one value per user")
