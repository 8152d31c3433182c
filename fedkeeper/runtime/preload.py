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


def load() -> list[str]:
    """Import what a client worker needs; returns the modules imported. One that fails is left to the worker."""
    for key, value in IMPORT_ENV.items():
        os.environ.setdefault(key, value)
    from fedkeeper import heap
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
    heap.unmap_clean_library_pages()  # import-only library pages: cache, not this process's, from here on
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
