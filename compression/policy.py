"""Budget policy: how many channels one transfer sends, from the link's rate and the time it may take.

The policy (pure; no clock, no sockets)::

    allowance_bytes = rate_bytes_per_s * time_share_s * headroom
    budget          = the candidate with the most bytes that are <= allowance_bytes
                      (ties: the larger budget); if none fits, the candidate with the fewest bytes

- **Why the most bytes that fit.** Budgets are nested (the channels kept at b are a subset
  of those kept at 2b) and accuracy grows with kept channels, so the largest budget that
  arrives in time is the most accurate one that does not make the request late.
- **If nothing fits** the cheapest budget is still sent: a late answer beats none, and
  ``plan_transfer`` reports ``fits=False`` so the caller can count or reject it.
- **rate_bytes_per_s**: the rate the coordinator allocated to this request on this link
  when there is one (it already accounts for the other users of the link), otherwise the
  link's measured rate (e.g. an exponentially weighted mean of recent transfer sizes over
  their durations).
- **time_share_s**: the part of the request's remaining time this link may use;
  ``split_time_share`` divides what is left after compute among the links of a request in
  proportion to their full-width bytes.
- **headroom** (< 1) keeps a margin for rate noise and framing.
- **Live changes.** The budget is chosen again for every transfer from the current numbers,
  so a new measured rate, a new allocation, or a new candidate list (an operator pinning a
  link to some budgets) takes effect on the next transfer; nothing is redeployed, because
  one trained codec serves every budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from .errors import CodecError

Budget = int | None  # None = full width


@dataclass(frozen=True)
class BudgetChoice:
    """What the policy picked and why."""

    budget: Budget
    nbytes: int  # bytes of the message at that budget
    allowance_bytes: float  # rate * time share * headroom
    fits: bool  # nbytes <= allowance_bytes


def plan_transfer(rate_bytes_per_s: float, time_share_s: float, budgets: Sequence[Budget],
                  bytes_per_budget: Mapping[Budget, int] | Callable[[Budget], int],
                  headroom: float = 1.0) -> BudgetChoice:
    """Pick a budget for one transfer (see the module docstring for the policy).

    Args:
        rate_bytes_per_s: allocated or measured link rate, bytes per second (>= 0, may be inf).
        time_share_s: seconds this transfer may take (>= 0).
        budgets: candidate budgets (ints; None = full width); must not be empty.
        bytes_per_budget: message bytes per candidate (e.g. ``codec.bytes_per_budget(shape, dtype)``)
            or a function giving them.
        headroom: fraction of the allowance to use, in (0, 1].
    Returns:
        The choice.
    """
    for name, v in (("rate_bytes_per_s", rate_bytes_per_s), ("time_share_s", time_share_s)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
            raise CodecError(f"{name} must be a number >= 0, got {v!r}")
    if not 0 < headroom <= 1:
        raise CodecError(f"headroom must lie in (0, 1], got {headroom!r}")
    if not budgets:
        raise CodecError("no candidate budgets: pass at least one (None = full width)")
    size = bytes_per_budget if callable(bytes_per_budget) else bytes_per_budget.__getitem__
    try:
        sized = [(int(size(b)), _rank(b), b) for b in budgets]
    except KeyError as e:
        raise CodecError(f"bytes_per_budget has no entry for budget {e.args[0]!r}") from None
    allowance = rate_bytes_per_s * time_share_s * headroom if time_share_s > 0 else 0.0
    fitting = [s for s in sized if s[0] <= allowance]
    nbytes, _, budget = (max(fitting, key=_key) if fitting else min(sized, key=_key))
    return BudgetChoice(budget, nbytes, allowance, bool(fitting))


def _key(s: tuple[int, float, Budget]) -> tuple[int, float]:
    return s[0], s[1]


def _rank(b: Budget) -> float:
    return math.inf if b is None else float(b)


def choose_budget(rate_bytes_per_s: float, time_share_s: float, budgets: Sequence[Budget],
                  bytes_per_budget: Mapping[Budget, int] | Callable[[Budget], int],
                  headroom: float = 1.0) -> Budget:
    """The budget ``plan_transfer`` picks (None = full width).

    Args:
        rate_bytes_per_s: allocated or measured link rate, bytes per second.
        time_share_s: seconds this transfer may take.
        budgets: candidate budgets (None = full width).
        bytes_per_budget: message bytes per candidate, a mapping or a function.
        headroom: fraction of the allowance to use.
    Returns:
        The chosen budget.
    """
    return plan_transfer(rate_bytes_per_s, time_share_s, budgets, bytes_per_budget, headroom).budget


def split_time_share(remaining_s: float, compute_s: float, full_bytes: Sequence[int]) -> list[float]:
    """Divide a request's time left after compute among its links, in proportion to full-width bytes.

    Args:
        remaining_s: time to the deadline.
        compute_s: estimated compute still to do on the request's path.
        full_bytes: each link's full-width message bytes.
    Returns:
        Seconds per link (all 0 when no time is left).
    """
    spare = max(0.0, remaining_s - compute_s)
    total = sum(full_bytes)
    if total <= 0:
        return [spare / max(1, len(full_bytes))] * len(full_bytes)
    return [spare * b / total for b in full_bytes]
