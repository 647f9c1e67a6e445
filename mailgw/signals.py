"""SIGHUP before ``mailgw run`` is ready must not kill it.

SIGHUP's default action terminates the process. ``mailgw run`` installs its reload handler
only once it serves (decision 25), after importing its modules, migrating the store and
starting its worker processes: a logrotate or an admin's ``kill -HUP`` in that second (and a
gateway forwarding SIGHUP to a worker process still starting) used to kill it. The entry
points call :func:`defer_sighup` first thing, before anything heavy is imported; a SIGHUP is
then only recorded, and the gateway reloads once when its real handler is in place
(:func:`take_deferred`). This module imports nothing of mailgw's, so it is cheap to load.

SIGUSR1 makes ``mailgw run`` (gateway and worker processes) write every thread's Python
stack to its standard error, and go on (:func:`dump_stacks_on_sigusr1`): what a gateway that
does not stop, or a worker that stands still, is waiting for.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
import threading

_received: list[int] = []


def _record(signum, frame) -> None:  # type: ignore[no-untyped-def]
    _received.append(signum)


def defer_sighup() -> None:
    """Record SIGHUP instead of dying of it, until the gateway installs its own handler."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, _record)


def dump_stacks_on_sigusr1() -> None:
    """SIGUSR1: every thread's stack to standard error (faulthandler), the process goes on.

    Written by a Python signal handler (the main thread, between two bytecodes, holding the
    interpreter lock), not by ``faulthandler.register``'s C handler: that one walks the
    threads' states at whatever instant the signal lands, and a thread starting or ending
    at that instant crashed the process (SIGSEGV; seen in CI with the scheduler's and the
    pool's threads, reproduced by tests/test_stack_dump.py). The cost: a main thread stuck
    in C code that never returns to Python writes nothing (waits on locks and joins do
    return to it for signals)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, _dump_stacks)


def _dump_stacks(signum, frame) -> None:  # type: ignore[no-untyped-def]
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


def take_deferred() -> bool:
    """Whether a SIGHUP arrived while it was deferred (and forget it)."""
    got = bool(_received)
    _received.clear()
    return got


def main() -> None:
    """The ``mailgw`` command: defer SIGHUP for ``mailgw run``, then the click CLI."""
    if "run" in sys.argv[1:]:
        defer_sighup()
        dump_stacks_on_sigusr1()
    from mailgw.cli import main as cli_main

    cli_main()
