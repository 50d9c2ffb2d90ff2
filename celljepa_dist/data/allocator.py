"""Process-wide malloc tuning for the TileDB read path (glibc only; elsewhere a no-op).

Reading the X layer allocates tens of MB per query: TileDB's tile and result buffers, Arrow
tables, the CSR arrays. By default glibc gives TileDB's worker threads their own arenas, serves
large requests with fresh mmaps and trims freed heap back to the kernel, so a query can fault its
pages in again, zeroing included, which on a VM costs more than decompressing into them. One
arena, a fixed mmap threshold at glibc's maximum and a high trim threshold keep freed buffers in
the process for the next query; the process then holds on to its peak heap instead of returning
it between queries. TileDB's own malloc_trim after each query, the larger cost, is switched off
separately (census.READ_TILEDB_CONFIG); on top of that this saves ~5-10% of the shard build's CPU
time on the development VM (docs/data.md).
"""
from __future__ import annotations

import ctypes
import sys

# <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD_MAX = 32 << 20  # glibc rejects larger values on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30


def tune_malloc_for_reading() -> bool:
    """Apply the settings above; returns whether all applied (False off glibc).

    Call it at program start, before the reading threads exist: arenas are created lazily and
    the arena limit only stops new ones."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc: nothing to tune
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 when it rejects a value.
    return all([mallopt(M_ARENA_MAX, 1) == 1, mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1,
                mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1])
