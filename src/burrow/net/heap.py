"""The C heap of a burrow process, for streaming: glibc's defaults hand every buffer of more
than 128 KiB to mmap and give freed heap back at every free, so a tunnel moving data page-
faults its way through fresh memory for each read and each TLS record (a third of the CPU of a
bulk transfer, measured). ``tune()`` keeps such buffers on the heap and stops the trimming;
``release_soon()`` hands free memory back once a burst of connections or sessions has ended,
so an idle process still shrinks. Both are no-ops away from glibc."""

from __future__ import annotations

import asyncio
from typing import Any

#: mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Buffers up to this size come from the heap (the largest burrow allocates is a 4 MiB window).
MMAP_THRESHOLD = 8 * 1024 * 1024
#: Free memory at the heap's top kept for the next read instead of returned at each free.
TRIM_THRESHOLD = 64 * 1024 * 1024
#: How long after the last end of a connection the heap is trimmed.
RELEASE_DELAY = 1.0

_libc: Any = None
_pending: asyncio.AbstractEventLoop | None = None


def _glibc() -> Any:
    global _libc
    if _libc is None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            _libc = libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc


def tune() -> None:
    """Set the thresholds for this process (call once, before traffic: the burrow processes
    do; an application embedding burrow decides for itself)."""
    libc = _glibc()
    if libc:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def release() -> None:
    """glibc's ``malloc_trim(0)``: return free heap pages to the system now."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


def release_soon(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """``release()`` once, ``RELEASE_DELAY`` after the first call of a burst."""
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
    global _pending
    if loop is _pending and not loop.is_closed():
        return

    def run() -> None:
        global _pending
        _pending = None
        release()

    _pending = loop
    loop.call_later(RELEASE_DELAY, run)
