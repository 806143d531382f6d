"""Errors of the scheduling library: malformed problems and allocation inputs.

Both derive from ``EdgesplitError`` (the one base a caller catches) and ``ValueError``
(they are always about bad input, never about the environment).
"""
from __future__ import annotations

from edgesplit.partitioner.errors import EdgesplitError


class ScheduleError(EdgesplitError, ValueError):
    """A scheduling problem or an order is malformed (unknown model, duplicate request, ...)."""


class BandwidthError(EdgesplitError, ValueError):
    """An allocation input is invalid (negative size, bad lengths, unknown rate model)."""
