"""Errors raised by the compression module.

Both derive from the project-wide ``EdgesplitError`` so a caller can catch everything
edgesplit raises on purpose; ``WireFormatError`` is the one a receiver sees when bytes
from the network do not describe a valid compressed activation.
"""
from __future__ import annotations

from edgesplit.partitioner.errors import EdgesplitError


class CodecError(EdgesplitError, ValueError):
    """A codec was asked for something it cannot do (unknown kind, bad budget, wrong shape)."""


class WireFormatError(CodecError):
    """A header/frames pair is malformed or inconsistent (untrusted data from a peer)."""
