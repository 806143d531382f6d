"""Which registered stages are resident, and making one resident by loading only its missing blocks.

A registered stage keeps its module skeleton for good; its blocks' parameters alias the
block cache's tensors while resident and sit on the ``meta`` device (no memory) while not.
Acquiring a stage pins its blocks, loads the missing ones through the cache (which may
evict other stages' blocks: those stages fall back to ``meta``), and points the module at
them. Shared blocks are loaded once and aliased by every stage that uses them, whatever
the model. Reads from the store run without the cache's lock (heartbeats and stages
already resident go on meanwhile); pointing a module at its tensors and eviction run under
it, and eviction never touches a module that is computing or loading (its blocks are pinned).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

from torch import nn

from edgesplit.partitioner import BlockHashMismatch, MissingBlocksError

from ..cache import BlockCache
from .stage import Stage


@dataclass
class Load:
    """What one acquire loaded: bytes read into the cache and the seconds it took (0 when resident)."""

    bytes: int = 0
    seconds: float = 0.0
    blocks: int = 0  # blocks read
    reused: int = 0  # of them, read into an evicted block's memory (no fresh pages)

    def add(self, other: "Load") -> None:
        self.bytes += other.bytes
        self.seconds += other.seconds
        self.blocks += other.blocks
        self.reused += other.reused


class Residency:
    """The worker's registered stages by (model, hop), seen from the block cache."""

    def __init__(self, cache: BlockCache) -> None:
        self.cache = cache
        self._users: dict[str, list[tuple[Stage, int]]] = {}  # block id -> (stage, child index) aliasing it
        cache.on_evict = self._evicted

    def register(self, stages: Iterable[Stage]) -> None:
        """Track these stages (their children are on ``meta`` until acquired)."""
        with self.cache.lock:
            for s in stages:
                for i, bid in enumerate(s.block_ids):
                    self._users.setdefault(bid, []).append((s, i))

    def unregister(self, stages: Iterable[Stage]) -> int:
        """Forget these stages and evict blocks no registered stage uses; returns the bytes freed.

        Their children let go of their tensors now, except those computing (pinned), which keep
        them until the forward pass returns and the module's last reference goes.
        """
        gone = list(stages)
        with self.cache.lock:
            before = self.cache.resident_bytes
            for s in gone:  # children not computing now let go of their tensors, so the bytes free
                for i, bid in enumerate(s.block_ids):
                    if s.loaded[i] and not self.cache.is_pinned(bid):
                        s.unbind(i)
            for s in gone:
                for bid in s.block_ids:
                    users = [(t, i) for t, i in self._users.get(bid, []) if t is not s]
                    if users:
                        self._users[bid] = users
                    else:
                        self._users.pop(bid, None)
                        self.cache.evict(bid)
            self.cache.drop_pool()  # released memory goes back to the system, not to a reserve
            return before - self.cache.resident_bytes

    def acquire(self, stage: Stage) -> tuple[nn.Module, Load]:
        """The stage's module with every block resident and pinned until :meth:`release`.

        Raises:
            DeployError: the blocks cannot fit the budget beside those computing now.
            MissingBlocksError: the local store lacks a block, or held a corrupt copy (now removed).
        """
        load = Load()
        self.cache.pin(stage.block_ids)
        try:
            for i, bid in enumerate(stage.block_ids):
                with self.cache.lock:
                    if stage.loaded[i] and bid in self.cache:
                        self.cache.get(bid)  # a hit: keeps LRU order true
                        continue
                stats = self.cache.stats
                before, reused, t0 = stats.bytes_loaded, stats.buffers_reused, time.perf_counter()
                try:
                    tensors = self.cache.get(bid)  # reads without holding the lock; pinned, so it stays
                except BlockHashMismatch as e:  # a corrupt local copy: drop it, so it can be fetched again
                    self.cache.store.discard(bid)
                    raise MissingBlocksError(f"{e} (removed from the local store)", [bid]) from None
                load.bytes += stats.bytes_loaded - before
                load.seconds += time.perf_counter() - t0
                load.blocks += stats.bytes_loaded > before  # else a hit: another stage had loaded it
                load.reused += stats.buffers_reused - reused
                with self.cache.lock:  # eviction (which moves children to meta) runs under it too
                    if not stage.loaded[i]:
                        stage.bind(i, tensors)  # alias: no copy
        except BaseException:
            self.cache.unpin(stage.block_ids)
            raise
        return stage.module, load

    def release(self, stage: Stage) -> None:
        self.cache.unpin(stage.block_ids)

    def is_resident(self, stage: Stage) -> bool:
        with self.cache.lock:
            return all(stage.loaded) and all(b in self.cache for b in stage.block_ids)

    def _evicted(self, bid: str) -> None:
        """The cache dropped ``bid``: every registered child aliasing it goes back to ``meta``."""
        for stage, i in self._users.get(bid, []):
            if stage.loaded[i]:
                stage.unbind(i)

