"""Uplink allocation: closed forms against root finding, EDF against the static split."""
import math
import random

import pytest
from scipy.optimize import brentq

from edgesplit.scheduling import uplink as bw

REL = 1e-6  # acceptance: closed forms agree with numeric root finding to 1e-6 relative


def _root_bandwidth(rate_bps: float, gain_hz: float) -> float:
    """b with b*log2(1 + a/b) = R by bracketing and Brent's method (no closed form)."""
    f = lambda b: bw.shannon_rate_bits_per_s(b, gain_hz) - rate_bps  # noqa: E731
    hi = 1.0
    while f(hi) < 0:
        hi *= 2.0
    return brentq(f, hi / 2 ** 80 if f(hi / 2 ** 80) < 0 else 1e-300, hi, xtol=1e-300, rtol=1e-14, maxiter=500)


@pytest.mark.timeout(20)
def test_shannon_closed_form_matches_root_finding():
    rng = random.Random(0)
    cases = [(2e6, 1e7)]  # the value worked out in notes/papers.md: b = 436,826.21 Hz
    cases += [(c * g / math.log(2), g) for c in (1e-6, 1e-3, 0.1, 0.5, 0.9, 0.99, 0.999) for g in (1e3, 1e7, 1e11)]
    cases += [(rng.uniform(0.01, 0.98) * g / math.log(2), g) for g in (10 ** rng.uniform(3, 12) for _ in range(200))]
    for rate, gain in cases:
        closed = bw.shannon_min_bandwidth_hz(rate, gain)
        numeric = _root_bandwidth(rate, gain)
        assert closed == pytest.approx(numeric, rel=REL), (rate, gain)
        assert bw.shannon_rate_bits_per_s(closed, gain) == pytest.approx(rate, rel=REL)
    assert bw.shannon_min_bandwidth_hz(2e6, 1e7) == pytest.approx(436_826.21, abs=0.01)


@pytest.mark.timeout(10)
def test_linear_closed_form_matches_root_finding():
    rng = random.Random(1)
    for _ in range(200):
        size, window = rng.uniform(1, 1e7), rng.uniform(1e-3, 10)
        numeric = brentq(lambda r: r * window - size, 0.0, 1e12, xtol=1e-12, rtol=1e-15)
        assert bw.linear_min_rate_bytes_per_s(size, window) == pytest.approx(numeric, rel=REL)


@pytest.mark.timeout(10)
def test_closed_form_edges():
    gain = 1e6
    assert bw.shannon_min_bandwidth_hz(0.0, gain) == 0.0
    assert bw.shannon_min_bandwidth_hz(gain / math.log(2), gain) == math.inf  # the cap as b -> inf
    assert bw.shannon_min_bandwidth_hz(2 * gain, gain) == math.inf
    assert bw.shannon_rate_bits_per_s(math.inf, gain) == pytest.approx(gain / math.log(2))
    assert bw.linear_min_rate_bytes_per_s(0, 0.0) == 0.0
    assert bw.linear_min_rate_bytes_per_s(10, 0.0) == math.inf
    with pytest.raises(bw.BandwidthError):
        bw.linear_min_rate_bytes_per_s(-1, 1.0)
    with pytest.raises(bw.BandwidthError):
        bw.static_split_linear([1, 2], [1.0], 10.0)


@pytest.mark.timeout(10)
def test_static_splits_by_hand():
    split = bw.static_split_linear([100, 300], [1.0, 2.0], 250.0)
    assert split.shares == (100.0, 150.0) and split.total == 250.0 and split.feasible
    assert not bw.static_split_linear([100, 300], [1.0, 2.0], 249.0).feasible
    sh = bw.static_split_shannon([125_000, 0], [1.0, 1.0], [1e7, 1e7], 1e6)  # 1 Mbit/s needed, 0 for the 2nd
    assert sh.unit == "Hz" and sh.shares[1] == 0.0
    assert bw.shannon_rate_bits_per_s(sh.shares[0], 1e7) == pytest.approx(1e6, rel=1e-9)


@pytest.mark.timeout(10)
def test_edf_link_by_hand():
    # rate 100 B/s. A: 100 B at t=0, priority 1; B: 50 B at t=0.5, priority 0 (preempts A).
    done = bw.edf_upload_completions([0.0, 0.5], [100, 50], 100.0, priority=[1, 0])
    assert done == pytest.approx((1.5, 1.0))
    # idle gap: C released at 3 starts at 3, not when the link last worked
    assert bw.edf_upload_completions([0.0, 3.0], [100, 100], 100.0) == pytest.approx((1.0, 4.0))
    assert bw.edf_upload_completions([0.2, 0.1], [0, 10], math.inf) == (0.2, 0.1)


def _static_feasible(rel, size, due, rate):
    return bw.static_split_linear(size, [d - r for r, d in zip(rel, due)], rate).feasible


@pytest.mark.timeout(30)
def test_edf_feasible_whenever_static_split_is():
    """(b) EDF on one link meets every due time whenever the static split (a) fits in B."""
    rng = random.Random(2)
    n_static = n_edf_only = 0
    for _ in range(3000):
        n = rng.randint(1, 8)
        rel = [rng.choice([0.0, rng.uniform(0, 2)]) for _ in range(n)]
        size = [rng.uniform(0, 100) for _ in range(n)]
        due = [r + rng.uniform(0.05, 3) for r in rel]
        rate = rng.uniform(20, 400)
        static = _static_feasible(rel, size, due, rate)
        edf = bw.edf_meets_due_times(rel, size, due, rate)
        if static:
            n_static += 1
            assert edf, (rel, size, due, rate)
        n_edf_only += edf and not static
    assert n_static > 300 and n_edf_only > 100  # both sides of the implication were exercised


@pytest.mark.timeout(10)
def test_implication_fails_for_the_shannon_model():
    """With a Shannon rate, splitting the band beats time-sharing it, so (a) does not imply (b)."""
    band, gain, size, window = 1e6, 1e7, 250_000.0, 1.0  # two users, 2 Mbit each, 1 s
    split = bw.static_split_shannon([size, size], [window, window], [gain, gain], band)
    assert split.feasible  # FDMA: half the band carries 2.2 Mbit/s per user
    full_rate = bw.shannon_rate_bits_per_s(band, gain) / bw.BITS_PER_BYTE  # one user on the whole band
    done = bw.edf_upload_completions([0.0, 0.0], [size, size], full_rate)
    assert max(done) > window  # time-sharing the band misses the second due time
