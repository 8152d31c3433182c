"""What the local runtime's fork server imports once, so client workers forked from it start warm and share its pages.

A worker started fresh imports TensorFlow itself: 4-5 s of CPU and about 590 MB of resident memory per
worker, 255 MB of it private heap. A worker forked from a process that has only imported it shares those
pages with that process until it writes them, and runs no import at all. This module runs in that process
(multiprocessing's fork server) before any fork. It only imports: a fork must not copy a started
TensorFlow runtime (its thread pools would not exist in the child), and TensorFlow starts that at the
first operation, not at import.
"""

from __future__ import annotations

import gc
import os

# Read by TensorFlow when it is imported, so they must be set before the import, here; a forked worker
# then sets its own environment (the runtime sends it whole) before any of its code runs.
IMPORT_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0", "OMP_NUM_THREADS": "1"}
MODULES = ("numpy", "tensorflow", "keras", "fedkeeper.models", "fedkeeper.functions.registry",
           "fedkeeper.functions.client", "fedkeeper.store")
imported: list[str] = []


MADV_DONTNEED = 4  # Linux's value on every architecture this runs on


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
    try:
        import ctypes

        with open("/proc/self/smaps") as fh:
            ranges = _clean_library_mappings(fh.read())
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    except (OSError, AttributeError, ValueError):  # not Linux: nothing to unmap
        return 0
    done = 0
    for start, end in ranges:
        if madvise(start, end - start, MADV_DONTNEED) == 0:  # a locked range refuses, and stays as it is
            done += end - start
    return done


def load() -> list[str]:
    """Import what a client worker needs; returns the modules imported. One that fails is left to the worker."""
    for key, value in IMPORT_ENV.items():
        os.environ.setdefault(key, value)
    from fedkeeper.runtime.worker import hide_undeployed

    hide_undeployed()  # as in every worker: Keras must not import libraries no deployed function has
    for name in MODULES:
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - e.g. a control-only install without TensorFlow: the worker imports what it can
            continue
        imported.append(name)
    # Python's collector writes to the header of every object it scans, which would copy the shared page that
    # holds it into each forked worker; frozen objects are never scanned again.
    gc.freeze()
    unmap_clean_library_pages()
    from fedkeeper.runtime.local import PRELOAD_READY_ENV

    marker = os.environ.pop(PRELOAD_READY_ENV, None)  # the runtime holds new workers back until this file exists
    if marker:
        try:
            with open(marker, "w"):
                pass
        except OSError:
            pass  # the runtime stops waiting after local.PRELOAD_WAIT_S
    return imported


load()
