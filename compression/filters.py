"""The trainable per-channel filter p of Mudvari et al.: ranking, budget masks, penalty, resets.

Channel c's weight is ``w_c = sigmoid(p_c)^2``. At budget b the top-b channels by w are
kept (ties broken by the lower index, so exactly b are kept and the kept set at b is a
subset of the kept set at 2b: one trained module serves every budget). As in the
reference code (amudvari/VCCprune ``utils.prune``), a kept channel is multiplied by its
weight ``w_c``, not by 1; the reference's ``np.partition`` threshold could keep more than
b channels on ties, this one keeps exactly b.
"""
from __future__ import annotations

import torch

from .errors import CodecError

EPSILON = 1000.0  # penalty scale eps of the reference code
DELTA = 0.01  # penalty sharpness delta used in all of the paper's experiments
FILTER_INIT_SCALE = 15.0  # p ~ 15 * U(0, 1) at construction (encodingUnit.scaler)


def filter_weights(p: torch.Tensor) -> torch.Tensor:
    """w = sigmoid(p)^2 for a (C,) filter."""
    return torch.sigmoid(p) ** 2


def channel_order(p: torch.Tensor) -> torch.Tensor:
    """Channel indices from most to least important (by w, ties to the lower index)."""
    w = filter_weights(p.detach().float().reshape(-1)).cpu()
    return torch.sort(-w, stable=True).indices  # (C,)


def kept_channels(p: torch.Tensor, budget: int | None) -> torch.Tensor | None:
    """Sorted indices of the channels kept at ``budget`` (None = every channel).

    Args:
        p: (C,) filter logits.
        budget: number of channels to keep, 1..C, or None for all.
    Returns:
        (budget,) long tensor in increasing order, or None.
    """
    c = p.numel()
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= c:
        raise CodecError(f"budget must be an int in [1, {c}] (or None for full width), got {budget!r}")
    return torch.sort(channel_order(p)[:budget]).values


def budget_mask(p: torch.Tensor, budget: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(kept indices, (C,) mask) at ``budget``: w_c on kept channels, 0 elsewhere; (None, None) = full.

    The mask is detached: as in the reference, the filter learns through ``x * sigmoid(p)``
    on the client and through the budget penalty, not through the mask.
    """
    kept = kept_channels(p, budget)
    if kept is None:
        return None, None
    w = filter_weights(p.detach().float().reshape(-1))
    mask = torch.zeros_like(w)
    mask[kept.to(w.device)] = w[kept.to(w.device)]
    return kept, mask


def budget_penalty(p: torch.Tensor, budget: float, eps: float = EPSILON, delta: float = DELTA) -> torch.Tensor:
    """2·eps·cosh(delta·(sum_c sigmoid(p_c)^2 − b)): pulls the filter's total weight to the budget.

    Args:
        p: (C,) filter logits (gradients flow).
        budget: target number of channels b.
        eps: penalty scale (1000 in the reference).
        delta: sharpness (0.01 in the paper's experiments).
    Returns:
        Scalar penalty; its minimum 2·eps is reached when the total weight equals b.
    """
    s = filter_weights(p.reshape(-1)).sum()
    return 2.0 * eps * torch.cosh(delta * (s - budget))


@torch.no_grad()
def reset_deprune(p: torch.Tensor, generator: torch.Generator | None = None, high: float = 15.0,
                  threshold: float = 0.9, low_range: float = 3.0) -> None:
    """Between deprune phases (reference ``resetdePrune``): p ← 15 where p ≥ 0.9, else U(0, 3).

    Channels the compressed phase kept alive stay fully open; the others restart half open
    so the uncompressed phase can bring them back.
    """
    fresh = torch.rand(p.shape, generator=generator) * low_range
    p.copy_(torch.where(p.detach().cpu() >= threshold, torch.full_like(fresh, high), fresh).to(p))


@torch.no_grad()
def reset_prune(p: torch.Tensor, threshold: float, generator: torch.Generator | None = None,
                low: float = -15.0, high_range: float = 3.0) -> None:
    """Reference ``resetPrune`` (unused by the paper's runs): p ← U(0, 3) where p > threshold, else −15."""
    fresh = torch.rand(p.shape, generator=generator) * high_range
    p.copy_(torch.where(p.detach().cpu() > threshold, fresh, torch.full_like(fresh, low)).to(p))
