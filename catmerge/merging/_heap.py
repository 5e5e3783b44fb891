"""Freed memory handed back to the OS during long loops over large temporaries (PCB's passes).

glibc serves allocations below its mmap threshold (dynamic, raised up to 32 MiB as large blocks
are freed) from the heap, and keeps what is freed there for reuse. When megabyte-sized
temporaries are freed between smaller blocks that live longer (histograms, gathered entries,
outputs), the holes cannot be reused in full and the process's RSS grows with every pass,
though the live data does not. PCB's `merged_vector` on 6 ViT-B/32 blocks of 8 in-memory task
vectors peaked 1.93 GB above its resident size before the call, and 1.0 GB with every large block mmapped
(MALLOC_MMAP_THRESHOLD_=65536, which costs a page fault per page of every temporary).
`HeapGuard` asks glibc's `malloc_trim` to return the free pages whenever the RSS has grown more
than `slack` bytes since the last trim: peak 1.30 GB above the inputs with 512 MiB (62 s against
49 s without; 1.20 GB with 256 MiB, 64 s; one run each, docs/benchmarks.md). Each returned page is
faulted in again when reused, hence a slack rather than a trim per step. Elsewhere than glibc on
Linux it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache

SLACK = 512 << 20  # bytes of growth above the live level before a trim


@cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def resident_bytes() -> int | None:
    """This process's current RSS (Linux), or None where /proc is not there."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapGuard:
    """Call it once per step of a loop: trims when the RSS grew `slack` bytes past the last level."""

    def __init__(self, slack: int = SLACK):
        self.slack = slack
        self.trim = _malloc_trim()
        self.level = resident_bytes()
        self.trims = 0

    def __call__(self) -> None:
        if self.trim is None or self.level is None:
            return
        now = resident_bytes()
        if now is not None and now > self.level + self.slack:
            self.trim(0)
            self.trims += 1
            self.level = resident_bytes() or now
        elif now is not None and now < self.level:
            self.level = now
