"""Worker processes: ``mailgw run --workers N`` processes mail on every core.

One Python process has one GIL: a worker thread beside the SMTP listener takes turns with it.
With ``--workers N`` the gateway starts N child processes (``mailgw run --role worker
--supervised``) and keeps the listeners, the sender and the scheduler itself. Nothing about
correctness depends on the children being few or well-behaved: they claim rows with the
same leased claims as workers on other nodes (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, the
write lock on SQLite), so each message is processed exactly once whatever they do.

The parent and each child are joined by two pipes, used only to wake each other:

- the parent writes a byte to a child's stdin after each intake commit (new mail to claim);
  end of file on stdin tells the child that the parent is gone, and it finishes its batch
  and exits;
- a child writes ``o`` to its stdout after a batch that queued mail (wake the sender).

A child that dies is started again (a second later, so a child that cannot start does not
spin); the new one frees the leases of the dead one at start (same host, pid gone).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


class WorkerPool:
    """The parent's side: start, wake, watch and stop N worker processes."""

    def __init__(self, home: Path, count: int, on_outbox, *, verbose: int = 0):  # type: ignore[no-untyped-def]
        self.home = home
        self.count = count
        self.on_outbox = on_outbox
        self.verbose = verbose
        self._procs: list[subprocess.Popen | None] = [None] * count
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "mailgw", "--home", str(self.home)]
        if self.verbose:
            cmd.append("-" + "v" * self.verbose)
        return [*cmd, "run", "--role", "worker", "--supervised"]

    def _spawn(self, slot: int) -> subprocess.Popen:
        # A session of its own: a terminal's Ctrl-C reaches the gateway, which stops the
        # children through their stdin once it no longer feeds them.
        proc = subprocess.Popen(self._command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                start_new_session=True)
        assert proc.stdin is not None and proc.stdout is not None
        os.set_blocking(proc.stdin.fileno(), False)
        line = proc.stdout.readline()  # "mailgw: ready (worker)"
        if b"ready" not in line:
            raise RuntimeError(f"worker process {slot} did not start (exit {proc.wait()})")
        threading.Thread(target=self._read, args=(proc,), name=f"worker{slot}-pipe",
                         daemon=True).start()
        log.info("worker process %d started (pid %d)", slot, proc.pid)
        return proc

    def start(self) -> None:
        """Start every child and wait until each is ready (so ``ready`` means ready)."""
        for slot in range(self.count):
            self._procs[slot] = self._spawn(slot)
        self._monitor = threading.Thread(target=self._watch, name="worker-pool", daemon=True)
        self._monitor.start()

    def _read(self, proc: subprocess.Popen) -> None:
        fd = proc.stdout.fileno()  # type: ignore[union-attr]
        while True:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return
            if not data:
                return
            if b"o" in data:
                self.on_outbox()

    def wake(self) -> None:
        """New mail is committed: wake every child (a full pipe means it is awake anyway)."""
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            if proc is None or proc.stdin is None:
                continue
            try:
                os.write(proc.stdin.fileno(), b"w")
            except (BlockingIOError, BrokenPipeError, OSError, ValueError):
                pass

    def signal(self, sig: int) -> None:
        """Pass a signal on to every child (SIGHUP: reload the filters)."""
        with self._lock:
            procs = [p for p in self._procs if p is not None]
        for proc in procs:
            try:
                proc.send_signal(sig)
            except OSError:
                pass

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            for slot, proc in enumerate(list(self._procs)):
                if proc is None or proc.poll() is None:
                    continue
                if self._stopping.is_set():
                    return
                log.error("worker process %d (pid %d) exited with %s; starting it again",
                          slot, proc.pid, proc.returncode)
                _close(proc)
                try:
                    new = self._spawn(slot)
                except Exception:  # noqa: BLE001 - logged; tried again on the next pass
                    log.exception("worker process %d could not be started", slot)
                    continue
                with self._lock:
                    self._procs[slot] = new

    def stop(self, timeout: float = 120.0) -> None:
        """Ask every child to finish its batch and exit (end of file on its stdin)."""
        self._stopping.set()
        if self._monitor:
            self._monitor.join()
        with self._lock:
            procs = [p for p in self._procs if p is not None]
        for proc in procs:
            _close(proc)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker process %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()

    def waker(self) -> threading.Event:
        """An Event whose ``set()`` wakes the children, for code written for a worker thread."""
        return _PoolWake(self)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None]


class _PoolWake(threading.Event):
    def __init__(self, pool: WorkerPool):
        super().__init__()
        self._pool = pool

    def set(self) -> None:
        self._pool.wake()


def _close(proc: subprocess.Popen) -> None:
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:
            pass


def supervised_child(stop: threading.Event, wake: threading.Event):  # type: ignore[no-untyped-def]
    """The child's side: wake on bytes from stdin, stop at its end; returns the callback
    that tells the parent mail was queued for the sender."""
    out = sys.stdout.buffer

    def listen() -> None:
        fd = sys.stdin.fileno()
        while True:
            try:
                data = os.read(fd, 4096)
            except OSError:
                data = b""
            if not data:
                stop.set()  # the parent is gone or asked us to stop
                wake.set()
                return
            wake.set()

    threading.Thread(target=listen, name="parent-pipe", daemon=True).start()

    def outbox() -> None:
        try:
            out.write(b"o")
            out.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass

    return outbox
