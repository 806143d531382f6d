"""Error types shared by every part of edgesplit.

One base class, so a caller can catch everything edgesplit raises on purpose; each
message names the object, what was expected, what was found, and what to do next.
"""
from __future__ import annotations


class EdgesplitError(Exception):
    """Base of every error edgesplit raises deliberately."""


class UnsupportedModelError(EdgesplitError, TypeError):
    """The model has no known decomposition into blocks."""


class MissingBlocksError(EdgesplitError, KeyError):
    """Blocks a stage needs are not in the store (or on any live worker)."""

    def __init__(self, message: str, block_ids: list[str] | None = None) -> None:
        super().__init__(message)
        self.block_ids = list(block_ids or [])

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class BlockHashMismatch(EdgesplitError, ValueError):
    """A stored or received block does not hash to its id (corrupt or truncated)."""


class ManifestError(EdgesplitError, ValueError):
    """A model manifest is missing, malformed, or inconsistent with the store."""


class UsageError(EdgesplitError, ValueError):
    """The user asked for something invalid (a flag, a split, an endpoint, a file): the CLI exits 2, writes nothing."""
