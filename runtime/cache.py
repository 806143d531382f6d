"""The worker's block cache: tensors of content-addressed blocks, resident on the stage's device.

Everything a worker loads goes through :meth:`BlockCache.get`, so the PartialLoading
scheduler can reason about one thing: which block ids are resident, what loading the
missing ones costs (``load_bytes_per_s`` is measured here), and what gets evicted. Blocks
of deployed stages are pinned; the rest are evicted least recently used first when the
byte budget would be exceeded.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import asdict, dataclass
from typing import Iterable

import torch

from edgesplit.partitioner import BlockStore

from .config import human_size
from .errors import DeployError


@dataclass
class CacheStats:
    """Counters since start (reported in heartbeats)."""

    hits: int = 0
    misses: int = 0
    bytes_loaded: int = 0
    evictions: int = 0
    load_s: float = 0.0  # time spent loading missing blocks (read + hash check + device copy)

    @property
    def load_bytes_per_s(self) -> float:
        return self.bytes_loaded / self.load_s if self.load_s > 0 else 0.0


def tensors_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class BlockCache:
    """LRU cache of blocks' tensors under a byte budget, loaded (hash-verified) from a store.

    Args:
        store: where missing blocks are read from (the worker fetches absent ones into it first).
        budget_bytes: most bytes of block tensors kept resident.
        device: where tensors are placed ("cpu", "cuda", "cuda:1").
    """

    def __init__(self, store: BlockStore, budget_bytes: int, device: str | torch.device = "cpu") -> None:
        self.store, self.budget_bytes, self.device = store, int(budget_bytes), torch.device(device)
        self._blocks: collections.OrderedDict[str, dict[str, torch.Tensor]] = collections.OrderedDict()
        self._sizes: dict[str, int] = {}
        self._pins: collections.Counter[str] = collections.Counter()
        self._lock = threading.RLock()
        self.stats = CacheStats()

    @property
    def resident_bytes(self) -> int:
        return sum(self._sizes.values())

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._blocks

    def resident(self) -> list[str]:
        """Ids of resident blocks, least recently used first."""
        with self._lock:
            return list(self._blocks)

    def get(self, block_id: str) -> dict[str, torch.Tensor]:
        """The block's tensors on the cache's device, loading (and evicting) when needed.

        Raises:
            MissingBlocksError: not in the store (fetch it first).
            BlockHashMismatch: the stored file is corrupt.
            DeployError: it cannot fit in the budget even after evicting every unpinned block.
        """
        with self._lock:
            hit = self._blocks.get(block_id)
            if hit is not None:
                self._blocks.move_to_end(block_id)
                self.stats.hits += 1
                return hit
            self.stats.misses += 1
            t0 = time.perf_counter()
            tensors = self.store.get(block_id, device=self.device)
            size = tensors_bytes(tensors)
            self._make_room(size, block_id)
            self._blocks[block_id] = tensors
            self._sizes[block_id] = size
            self.stats.bytes_loaded += size
            self.stats.load_s += time.perf_counter() - t0
            return tensors

    def _make_room(self, size: int, block_id: str) -> None:
        if size > self.budget_bytes:
            raise DeployError(f"block {block_id[:12]} needs {human_size(size)}, the worker's memory budget is "
                              f"{human_size(self.budget_bytes)}; raise --memory-budget or cut the model finer")
        for victim in list(self._blocks):
            if self.resident_bytes + size <= self.budget_bytes:
                return
            if self._pins[victim] == 0:
                self.evict(victim)
        if self.resident_bytes + size > self.budget_bytes:
            raise DeployError(f"cannot load block {block_id[:12]} ({human_size(size)}): "
                              f"{human_size(self.resident_bytes)} of the {human_size(self.budget_bytes)} budget "
                              "is held by deployed stages; undeploy a model or raise --memory-budget")

    def evict(self, block_id: str) -> bool:
        """Drop a resident, unpinned block; False if absent or pinned."""
        with self._lock:
            if block_id not in self._blocks or self._pins[block_id]:
                return False
            del self._blocks[block_id]
            del self._sizes[block_id]
            self.stats.evictions += 1
            return True

    def pin(self, block_ids: Iterable[str]) -> None:
        """Keep these blocks resident until unpinned (a deployed stage uses them)."""
        with self._lock:
            for b in block_ids:
                self._pins[b] += 1

    def unpin(self, block_ids: Iterable[str]) -> None:
        with self._lock:
            for b in block_ids:
                if self._pins[b] > 0:
                    self._pins[b] -= 1

    def report(self) -> dict[str, float | int]:
        """Counters and occupancy for telemetry."""
        with self._lock:
            return {**asdict(self.stats), "resident_bytes": self.resident_bytes, "budget_bytes": self.budget_bytes,
                    "resident_blocks": len(self._blocks), "load_bytes_per_s": self.stats.load_bytes_per_s}
