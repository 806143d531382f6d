"""The worker's block cache: tensors of content-addressed blocks, resident on the stage's device.

Everything a worker loads goes through :meth:`BlockCache.get`, so one place knows which
block ids are resident, what loading the missing ones costs (``load_bytes_per_s`` is
measured here, store read to device memory) and what gets evicted. A block is held once,
however many stages of however many models use it. Blocks in use by a forward pass (or a
load in progress) are pinned; the rest are evicted when the byte budget would be
exceeded: first those the coordinator's hint does not name, least recently used first,
then the one named farthest in the future (Belady's rule).

On the host, an evicted block's memory is kept for the next load (``pooled_bytes``, inside
the budget) when nothing else references it: reading into memory the process already has
skips the page faults that make a fresh buffer several times slower to fill, so a switch
costs the read, not the allocation.
"""
from __future__ import annotations

import collections
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Mapping

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
    bytes_evicted: int = 0
    load_s: float = 0.0  # time spent loading missing blocks (store read + integrity check + device copy)
    resident_max_bytes: int = 0  # the peak of resident bytes (never above the budget)
    buffers_reused: int = 0  # loads that went into an evicted block's memory

    @property
    def load_bytes_per_s(self) -> float:
        return self.bytes_loaded / self.load_s if self.load_s > 0 else 0.0


POOL_SLACK_BYTES = 64 * 1024  # a pooled buffer takes a block at most this much smaller than itself


def tensors_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class BlockCache:
    """Blocks' tensors under a byte budget, loaded (integrity-checked) from a store.

    Args:
        store: where missing blocks are read from (the worker fetches absent ones into it first).
        budget_bytes: most bytes of block tensors kept resident.
        device: where tensors are placed ("cpu", "cuda", "cuda:1").
        on_evict: called with a block id after it left the cache (under the cache's lock), so
            modules aliasing its tensors can let go of them.
    """

    def __init__(self, store: BlockStore, budget_bytes: int, device: str | torch.device = "cpu",
                 on_evict: Callable[[str], None] | None = None) -> None:
        self.store, self.budget_bytes, self.device = store, int(budget_bytes), torch.device(device)
        self.on_evict = on_evict
        self._blocks: collections.OrderedDict[str, dict[str, torch.Tensor]] = collections.OrderedDict()
        self._sizes: dict[str, int] = {}
        self._pins: collections.Counter[str] = collections.Counter()
        self._next_use: dict[str, int] = {}  # the coordinator's hint: block id -> rank of its next use
        self._pool: list[torch.Tensor] = []  # evicted blocks' host buffers (uint8), for the next loads
        self._refs: dict[str, tuple[int, ...] | None] = {}  # block id -> references to its host storage when loaded
        self._loading: dict[str, tuple[threading.Event, int]] = {}  # block id -> (done, bytes reserved) while read
        self.lock = threading.RLock()  # also guards what aliases the tensors (the worker's stage modules)
        self.stats = CacheStats()

    @property
    def resident_bytes(self) -> int:
        return sum(self._sizes.values())

    @property
    def reserved_bytes(self) -> int:
        """Room held for blocks being read now (outside the lock)."""
        return sum(r for _, r in self._loading.values())

    @property
    def pooled_bytes(self) -> int:
        return sum(b.numel() for b in self._pool)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._blocks

    def resident(self) -> list[str]:
        """Ids of resident blocks, least recently used first."""
        with self.lock:
            return list(self._blocks)

    def get(self, block_id: str) -> dict[str, torch.Tensor]:
        """The block's tensors on the cache's device, loading (and evicting) when needed.

        Raises:
            MissingBlocksError: not in the store (fetch it first).
            BlockHashMismatch: the stored file is corrupt.
            DeployError: it cannot fit in the budget even after evicting every unpinned block.
        """
        while True:
            with self.lock:
                hit = self._blocks.get(block_id)
                if hit is not None:
                    self._blocks.move_to_end(block_id)
                    self.stats.hits += 1
                    return hit
                other = self._loading.get(block_id)
                if other is None:
                    self.stats.misses += 1
                    t0 = time.perf_counter()
                    into, need = self._room_for(block_id)
                    done = threading.Event()
                    self._loading[block_id] = (done, need)
                    break
            other[0].wait()  # another thread reads it: take its result (or try ourselves if it failed)
        try:  # the read, the slow part, runs without the lock: heartbeats and resident stages go on
            tensors = self.store.get(block_id, device=self.device, into=into)
        except BaseException:
            with self.lock:
                del self._loading[block_id]
            done.set()
            raise
        reused = into is not None
        del into  # counted below, it would hold the memory as if someone else did
        refs = _storage_refs(tensors)
        size = next(iter(tensors.values())).untyped_storage().nbytes() if refs is not None else \
            tensors_bytes(tensors)  # host: the whole buffer (header and slack included) is held
        with self.lock:
            del self._loading[block_id]
            try:
                self._make_room(size, block_id)  # the reservation was the file's size; this is what is held
            finally:
                done.set()
            self._blocks[block_id] = tensors
            self._sizes[block_id] = size
            self._refs[block_id] = refs
            self.stats.resident_max_bytes = max(self.stats.resident_max_bytes, self.resident_bytes)
            self.stats.bytes_loaded += tensors_bytes(tensors)
            self.stats.buffers_reused += reused
            self.stats.load_s += time.perf_counter() - t0
            return tensors

    def _room_for(self, block_id: str) -> tuple[torch.Tensor | None, int]:
        """Make room for a block about to load: a pooled buffer to read it into (if one fits), and the
        bytes to reserve while it is read."""
        need = self.store.file_bytes(block_id)  # ~ the tensors' bytes: room is made before anything is allocated
        victims = self._victims()
        while True:
            fits = [b for b in self._pool if need <= b.numel() <= need + POOL_SLACK_BYTES]
            if fits:
                buf = min(fits, key=lambda b: b.numel())
                self._pool = [b for b in self._pool if b is not buf]
                self._make_room(buf.numel(), block_id)
                return buf, buf.numel()
            if self.resident_bytes + self.pooled_bytes + self.reserved_bytes + need <= self.budget_bytes:
                return None, need
            if self._pool:  # spare buffers that do not fit go before anything resident
                self._pool.sort(key=lambda b: b.numel())
                self._pool.pop()
            elif victims:
                self.evict(victims.pop(0))  # its buffer joins the pool: the next turn may take it
            else:
                self._make_room(need, block_id)  # raises with the numbers

    def _victims(self) -> list[str]:
        """Unpinned blocks in eviction order: unhinted (LRU first), then farthest next use first."""
        free = [b for b in self._blocks if not self._pins[b]]  # LRU order
        unhinted = [b for b in free if b not in self._next_use]
        hinted = sorted((b for b in free if b in self._next_use), key=lambda b: -self._next_use[b])
        return unhinted + hinted

    def _make_room(self, size: int, block_id: str) -> None:
        """Evict (then drop pooled buffers) until ``size`` more bytes fit the budget."""
        if size > self.budget_bytes:
            raise DeployError(f"block {block_id[:12]} needs {human_size(size)}, the worker's memory budget is "
                              f"{human_size(self.budget_bytes)}; raise --memory-budget or cut the model finer")
        victims = self._victims()
        while self.resident_bytes + self.pooled_bytes + self.reserved_bytes + size > self.budget_bytes:
            held = self.resident_bytes + self.reserved_bytes
            if victims:
                self.evict(victims.pop(0))  # its buffer joins the pool: the next load may reuse it
                if self.resident_bytes + self.reserved_bytes + size <= self.budget_bytes:
                    self._trim_pool(self.budget_bytes - self.resident_bytes - self.reserved_bytes - size)
            elif self._pool:
                self._trim_pool(self.budget_bytes - held - size)
            else:
                raise DeployError(f"cannot load block {block_id[:12]} ({human_size(size)}): "
                                  f"{human_size(held)} of the {human_size(self.budget_bytes)} budget is held by "
                                  "stages computing or loading now; try again, or raise --memory-budget")

    def drop_pool(self) -> int:
        """Free every pooled buffer (after an undeploy the memory goes back); returns the bytes."""
        with self.lock:
            n = self.pooled_bytes
            self._pool.clear()
            return n

    def _trim_pool(self, keep_bytes: int) -> None:
        """Free pooled buffers, largest first, until at most ``keep_bytes`` stay pooled."""
        self._pool.sort(key=lambda b: b.numel())
        while self._pool and self.pooled_bytes > max(0, keep_bytes):
            self._pool.pop()

    def evict(self, block_id: str) -> bool:
        """Drop a resident, unpinned block; False if absent or pinned."""
        with self.lock:
            if block_id not in self._blocks or self._pins[block_id]:
                return False
            tensors = self._blocks.pop(block_id)
            self.stats.bytes_evicted += self._sizes.pop(block_id)
            self.stats.evictions += 1
            if self.on_evict is not None:
                self.on_evict(block_id)  # modules let go of its tensors
            buf = _sole_buffer(tensors, self._refs.pop(block_id, None))
            if buf is not None:
                self._pool.append(buf)
            return True

    def pin(self, block_ids: Iterable[str]) -> None:
        """Keep these blocks resident (once loaded) until unpinned: a forward pass or a load uses them."""
        with self.lock:
            for b in block_ids:
                self._pins[b] += 1

    def unpin(self, block_ids: Iterable[str]) -> None:
        with self.lock:
            for b in block_ids:
                if self._pins[b] > 1:
                    self._pins[b] -= 1
                else:
                    self._pins.pop(b, None)

    def is_pinned(self, block_id: str) -> bool:
        return self._pins[block_id] > 0

    def hint(self, next_use: Mapping[str, int]) -> None:
        """The coordinator's view of the future: block id -> rank of its next use (lower = sooner)."""
        with self.lock:
            self._next_use = dict(next_use)

    def report(self) -> dict[str, float | int]:
        """Counters and occupancy for telemetry."""
        with self.lock:
            return {**asdict(self.stats), "resident_bytes": self.resident_bytes, "budget_bytes": self.budget_bytes,
                    "pooled_bytes": self.pooled_bytes, "loading_bytes": self.reserved_bytes,
                    "resident_blocks": len(self._blocks), "pinned_blocks": len(self._pins),
                    "load_bytes_per_s": self.stats.load_bytes_per_s}


def _storage_refs(tensors: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    """References to a block's memory: to its one host storage, then to each of its tensors.

    None when the tensors do not view one host storage. Counted the same way at load and at
    eviction, so the two compare: equal means nothing but the cache's own entry holds the
    memory (not a module's parameter or buffer, not a view, not a caller's variable).
    """
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    views = list(tensors.values())
    if use_count is None or not views or any(t.device.type != "cpu" for t in views):
        return None
    storage = views[0].untyped_storage()
    if any(t.untyped_storage().data_ptr() != storage.data_ptr() for t in views):
        return None
    return (int(use_count(storage._cdata)), *(sys.getrefcount(t) for t in tensors.values()))


def _sole_buffer(tensors: dict[str, torch.Tensor], refs_at_load: tuple[int, ...] | None) -> torch.Tensor | None:
    """The host buffer of an evicted block, for reuse, if nothing else references it; else None.

    Reusing memory that something still reads would corrupt it silently, so a buffer is
    pooled only when every count is back to what it was when the block was loaded (the
    storage count is torch's; without it nothing is pooled).
    """
    if refs_at_load is None or _storage_refs(tensors) != refs_at_load:
        return None
    storage = next(iter(tensors.values())).untyped_storage()
    return torch.empty(0, dtype=torch.uint8).set_(storage)
