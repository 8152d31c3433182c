"""Ctrl-C with child processes: the parent reports it once; children end at once and without a traceback."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Iterator


def quiet_interrupts() -> None:
    """In a child process: Ctrl-C ends it at once and without a traceback; the parent reports the interrupt.

    The terminal sends Ctrl-C to every process of the group. Children start with it blocked (see
    interrupts_held), so one that arrives during start-up waits here and then ends the process quietly.
    Store writes are atomic, so a process ended mid-write leaves nothing half-written.
    """
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C back while child processes start: they inherit the block, so Python's start-up never dies of it.

    Blocking the signal is not enough in the parent: one the kernel delivered just before the block is run by
    Python's handler a few bytecodes later, which could raise KeyboardInterrupt in the middle of starting a
    child (after the fork, before the child was sent its start-up data, so the child died printing EOFError).
    So the parent's handler only records Ctrl-C meanwhile, and the interrupt is raised once the start is done.
    """
    if os.name == "posix":
        # CPython's resource tracker unblocks SIGINT after starting its own process, so the first child started
        # in the held region would run unprotected: start the tracker before the block.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    pending: list = []
    swap = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    handler = signal.signal(signal.SIGINT, lambda *args: pending.append(args)) if swap else None
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        # A Ctrl-C that came meanwhile is delivered here, in the parent, as a KeyboardInterrupt.
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if swap:
            signal.signal(signal.SIGINT, handler)
            if pending:
                if callable(handler):
                    handler(*pending[0])
                elif handler != signal.SIG_IGN:
                    raise KeyboardInterrupt


def start_quietly(proc: Any) -> None:
    """Start a child process whose code calls quiet_interrupts first, with Ctrl-C held back until it has."""
    with interrupts_held():
        proc.start()
