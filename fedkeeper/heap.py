"""Give the heap pages a process has freed back to the operating system, where the C library keeps them."""

from __future__ import annotations

import ctypes
from typing import Any

_TRIM: list[Any] = []  # glibc's malloc_trim once looked up, or None where there is none


def release() -> bool:
    """Return freed heap pages to the OS (glibc's malloc_trim); True if it ran, False where there is no such call.

    glibc keeps freed pages mapped so the next allocation is cheap; a process that has finished a phase whose
    buffers will not come back (setup's partitions, a compile) holds them for nothing until it exits.
    """
    if not _TRIM:
        try:
            _TRIM.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):  # musl, macOS: nothing to call
            _TRIM.append(None)
    if _TRIM[0] is None:
        return False
    _TRIM[0](0)
    return True
