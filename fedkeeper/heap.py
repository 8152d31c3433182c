"""Give memory a process no longer uses back to the operating system: freed heap pages, library pages only read."""

from __future__ import annotations

import ctypes
import functools
from typing import Any

MADV_DONTNEED = 4  # Linux's value on every architecture this runs on


@functools.cache
def _libc() -> Any:
    """The C library, once looked up, or None where there is no glibc (musl, macOS)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.malloc_trim, libc.madvise  # noqa: B018 - both must exist, or neither is used
    except (OSError, AttributeError):
        return None
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def release() -> bool:
    """Return freed heap pages to the OS (glibc's malloc_trim); True if it ran, False where there is no such call.

    glibc keeps freed pages mapped so the next allocation is cheap; a process that has finished a phase whose
    buffers will not come back (setup's partitions, a compile) holds them for nothing until it exits.
    """
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def _clean_library_mappings(smaps: str) -> list[tuple[int, int]]:
    """The address ranges of file mappings in `smaps` (the text of /proc/PID/smaps) that cannot be written and
    hold no page of their own: every resident page in them is the file's, as on disk."""
    out: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    eligible = False
    for line in smaps.splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and len(head[1]) == 4:  # a mapping's header line
            start, _, end = head[0].partition("-")
            path = head[5].strip() if len(head) > 5 else ""
            current = (int(start, 16), int(end, 16))
            # Not writable, and backed by a file: a private copy can only come from mprotect after a write
            # (relocated data), which the Anonymous count below shows.
            eligible = "w" not in head[1] and head[4] != "0" and path.startswith("/")
        elif current is not None and head and head[0] == "Anonymous:":
            if eligible and int(head[1]) == 0:
                out.append(current)
            current = None
    return out


def unmap_clean_library_pages() -> int:
    """Unmap the library pages this process has only read, keeping them in the page cache; returns the bytes
    of the ranges unmapped.

    Importing TensorFlow runs code and reads data, such as its kernel registrations, that nothing runs again:
    about 225 MB of library pages that stayed mapped in the fork server and in no worker. Unmapped, they stay
    in the page cache, which the kernel frees when it needs to, and a worker faults in from there, at memory
    speed, the pages it uses. Only mappings that cannot be written and hold no private copy are touched, so
    every page comes back exactly as the file has it.
    """
    libc = _libc()
    if libc is None:
        return 0
    try:
        with open("/proc/self/smaps") as fh:
            ranges = _clean_library_mappings(fh.read())
    except (OSError, ValueError):  # no /proc: nothing to unmap
        return 0
    done = 0
    for start, end in ranges:
        if libc.madvise(start, end - start, MADV_DONTNEED) == 0:  # a locked range refuses, and stays as it is
            done += end - start
    return done
