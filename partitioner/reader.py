"""Chunked block-file reads: one buffer per file, an optional read-rate cap, a running fast digest.

The store's load path is bound by how fast bytes reach memory, so reads go straight into the
buffer the tensors will live in (no intermediate ``bytes``), chunk by chunk, and the xxh3
digest is updated on each chunk while it is still in the CPU's cache. Two costs dominate
the rest, and both are handled here rather than left to the allocator:

* fresh memory costs page faults on first touch (about 1.3-1.7 GB/s here); the block cache
  avoids them in steady state by reading into evicted blocks' memory. Transparent huge pages
  (``MADV_HUGEPAGE``) were tried and dropped: with THP ``defrag`` at ``madvise`` a fault
  compacts memory first, and on a machine that had run for a while a 173 MB first load fell
  to 0.05-0.5 GB/s (against 1.3-1.4 without), where on a fresh one it rose to 7.5;
* a CUDA target gets the file through two small pinned staging chunks, each copied to the
  device while the next one is read: no whole-file pinned buffer, no host copy kept.

``ReadRateCap`` emulates a board's storage (eMMC, SD card, NVMe) on a faster machine.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable

import torch
import xxhash

READ_CHUNK_BYTES = 8 << 20  # per read() call and per cap step; 1 and 8 MiB read at the same rate here


class ReadRateCap:
    """Paces reads so that bytes delivered never run ahead of ``rate_bps`` (no burst allowance).

    One cap per store, shared by its threads: it emulates one device. A reader reserves a
    chunk before reading it and waits for the chunk's due time after using it, so work done
    on a chunk (hashing it) overlaps the emulated transfer instead of adding to it.
    """

    def __init__(self, rate_bps: float) -> None:
        if not rate_bps > 0 or rate_bps == float("inf"):
            raise ValueError(f"read rate cap must be a positive number of bytes/s, got {rate_bps!r}")
        self.rate_bps = float(rate_bps)
        self._free_at = 0.0  # perf_counter time at which the emulated device has delivered all reservations
        self._lock = threading.Lock()

    def reserve(self, n_bytes: int) -> float:
        """Book ``n_bytes`` of transfer; returns the time (perf_counter) they are due."""
        with self._lock:
            self._free_at = max(self._free_at, time.perf_counter()) + n_bytes / self.rate_bps
            return self._free_at

    @staticmethod
    def wait(due: float) -> None:
        """Sleep until ``due`` (time.sleep may wake early on some platforms: loop)."""
        while (left := due - time.perf_counter()) > 0:
            time.sleep(left)


def host_buffer(n_bytes: int, pin: bool = False) -> torch.Tensor:
    """A fresh uint8 CPU buffer for a file's bytes (pinned when asked)."""
    return torch.empty(n_bytes, dtype=torch.uint8, pin_memory=pin)


@dataclass
class ChunkReader:
    """Reads a file's bytes in chunks under an optional cap, feeding an optional digest."""

    f: BinaryIO  # opened with buffering=0: readinto goes straight to the destination
    cap: ReadRateCap | None = None
    chunk_bytes: int = READ_CHUNK_BYTES
    digest: "xxhash.xxh3_128 | None" = None
    done: int = 0  # bytes read so far

    def read_into(self, dest: memoryview, on_chunk: Callable[[int, int], None] | None = None) -> None:
        """Fill ``dest`` exactly; ``on_chunk(start, n)`` sees each chunk (offsets into ``dest``).

        Raises:
            EOFError: the file ended first (it was truncated while being read).
        """
        off, total = 0, len(dest)
        while off < total:
            want = min(self.chunk_bytes, total - off)
            due = self.cap.reserve(want) if self.cap is not None else None
            got = 0
            while got < want:
                k = self.f.readinto(dest[off + got:off + want])
                if not k:
                    raise EOFError(f"file ended after {self.done + off + got} bytes")
                got += k
            if self.digest is not None:
                self.digest.update(dest[off:off + want])
            if on_chunk is not None:
                on_chunk(off, want)
            if due is not None:
                ReadRateCap.wait(due)
            off += want
        self.done += total

    def read(self, n_bytes: int) -> bytes:
        """``n_bytes`` as a small ``bytes`` object (the header)."""
        buf = bytearray(n_bytes)
        self.read_into(memoryview(buf))
        return bytes(buf)


def file_size(f: BinaryIO) -> int:
    return os.fstat(f.fileno()).st_size


def read_to_device(reader: ChunkReader, n_bytes: int, device: torch.device) -> torch.Tensor:
    """Stream ``n_bytes`` to a new uint8 tensor on an accelerator through two staging chunks.

    The copies are asynchronous from pinned memory (CUDA); the caller synchronizes once.
    """
    out = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    if n_bytes == 0:
        return out
    cuda = device.type == "cuda"
    size = min(reader.chunk_bytes, n_bytes)
    stages = [torch.empty(size, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    events: list[torch.cuda.Event | None] = [None, None]
    at = 0
    while at < n_bytes:
        i = (at // size) % 2
        if events[i] is not None:
            events[i].synchronize()  # its previous copy has left the staging chunk
        n = min(size, n_bytes - at)
        reader.read_into(memoryview(stages[i].numpy())[:n])
        out[at:at + n].copy_(stages[i][:n], non_blocking=cuda)
        if cuda:
            events[i] = torch.cuda.Event()
            events[i].record()
        at += n
    return out
