"""``mailgw run``: every role of the gateway in one process, until SIGINT or SIGTERM.

Roles: ``smtp`` (the SMTP and LMTP listeners), ``worker``, ``sender``, ``scheduler`` and ``imap``
(one poller per configured IMAP mailbox). All run
by default; ``--role`` picks some, so roles can be split across processes and nodes sharing
PostgreSQL. Shutdown is clean and loses nothing: listeners stop accepting, messages already
being received are committed (or refused with 4xx), the worker finishes its transaction, and
whatever is still pending stays in the database for the next start.

SIGHUP reloads config/mailgw.yaml and the filters (docs/architecture.md, decision 25): a valid
config replaces the running one for everything that reads it per message or per job (queues,
agents, SLAs, templates, loop protection, auto-responses…); a config that fails validation, or
whose filters no longer compile against it, is logged with file, line and reason and the
running config stays in force. Listeners, the store, the relay and the IMAP mailboxes are
opened once: a change to them is logged as taking effect at the next start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from mailgw.filters.loader import load_pipeline
from mailgw.filters.reload import PipelineHolder
from mailgw.gctune import settle
from mailgw.intake.smtp import IntakeHandler, protocol_factory
from mailgw.outbound.render import Renderer
from mailgw.outbound.sender import Sender
from mailgw.process import Context
from mailgw.queue import GroupCommitWriter
from mailgw.settings import ConfigError, Home, Listener, Settings, display_path
from mailgw.signals import take_deferred
from mailgw.store.db import is_sqlite, make_engine, migrate
from mailgw.worker import Worker, pending_count, release_dead_claims

log = logging.getLogger(__name__)
ROLES = ("smtp", "worker", "sender", "scheduler", "imap")
# Settings read once, when the gateway starts: a reload that changes them says so.
RESTART_ONLY = ("store_url", "smtp", "lmtp", "hostname", "relay", "sender", "worker",
                "mailboxes", "sla_sweep", "filters_dir", "filters_reload_interval")


def event_loop_name() -> str:
    """The event loop the SMTP/LMTP listeners run on: uvloop's (libuv) when it is installed,
    asyncio's own otherwise or when ``MAILGW_EVENT_LOOP=asyncio`` (decision 37)."""
    if os.environ.get("MAILGW_EVENT_LOOP", "").strip().lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run_loop(coro: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run(coro)`` on the loop ``event_loop_name`` names."""
    name = event_loop_name()
    log.info("event loop: %s", name)
    if name == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro)
    else:
        asyncio.run(coro)


class ListenError(Exception):
    """A listener could not be opened (address in use, permission denied…)."""


@dataclass
class Gateway:
    home: Home
    settings: Settings
    roles: tuple[str, ...] = ROLES
    smtp_override: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    filters: PipelineHolder | None = None  # the worker's filter pipeline, hot-reloaded
    # Worker processes (mailgw/workers.py): 0 runs the worker as a thread of this process.
    workers: int = 0
    supervised: bool = False  # this process is such a worker, started by a gateway
    _pool: Any = None  # the WorkerPool when workers > 0
    # Reads config/mailgw.yaml again (SIGHUP); None: the config is not reloaded.
    loader: Callable[[], Settings] | None = None
    _ctx: Context | None = None  # the worker's context; replaced on reload
    _handlers: list[Any] = field(default_factory=list)  # SMTP/LMTP handlers (.settings)
    _sweeper: Any = None  # the SLA sweeper (.settings)
    _reload_lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> int:
        if "worker" in self.roles:
            # Refuses to start on invalid filters (FilterError); later edits are checked by
            # mtime once per batch (and at once on SIGHUP), and a bad edit keeps the old rules.
            self.filters = PipelineHolder(
                self.home.filters_dir(self.settings), self.settings, self.home.templates,
                interval=self.settings.filters_reload_interval)
        engine = make_engine(self.home.store_url(self.settings))
        migrate(engine)
        # The worker's own engine: on SQLite its commits are not fsynced (decision 36); the
        # intake, the sender and the scheduler keep FULL on ``engine``.
        worker_engine = None
        ctx = self._ctx = Context(self.settings, Renderer(self.home.templates))
        worker_wake, sender_wake = threading.Event(), threading.Event()
        threads: list[threading.Thread] = []
        pool = None
        if "worker" in self.roles and self.workers:
            # Each worker process loads (and hot-reloads by mtime) the filters itself.
            from mailgw.workers import WorkerPool

            pool = WorkerPool(self.home.path, self.workers, sender_wake.set)
            pool.start()
            self._pool = pool
            worker_wake = pool.waker()
        elif "worker" in self.roles:
            on_outbox = sender_wake.set
            if self.supervised:
                from mailgw.workers import supervised_child

                on_outbox = supervised_child(self.stop, worker_wake)
            holder = self.filters
            worker_engine = (make_engine(self.home.store_url(self.settings), synchronous="NORMAL")
                             if is_sqlite(engine) else engine)
            worker = Worker(worker_engine, lambda: replace(self._ctx, pipeline=holder.current()),  # type: ignore[arg-type, union-attr]
                            batch_size=self.settings.worker.batch_size,
                            max_attempts=self.settings.worker.max_attempts,
                            on_outbox=on_outbox)
            threads.append(threading.Thread(
                target=worker.run, name="worker",
                args=(self.stop, worker_wake, self.settings.worker.poll_interval)))
        if "sender" in self.roles:
            sender = Sender(engine, self.settings.relay, self.home.outbox_dir, self.settings.sender)
            threads.append(threading.Thread(target=sender.run, name="sender",
                                            args=(self.stop, sender_wake)))
        scheduler = None
        if "scheduler" in self.roles:
            scheduler = BackgroundScheduler(timezone="UTC")
            # Retries fall due while nothing else happens: wake the sender for them.
            scheduler.add_job(sender_wake.set, "interval", seconds=5, id="outbox-wakeup",
                              coalesce=True, max_instances=1)
            scheduler.add_job(self._housekeeping, "interval", minutes=1, args=(engine,),
                              id="housekeeping", coalesce=True, max_instances=1)
            from mailgw.loops import prune  # the loop-protection counters outside the window

            scheduler.add_job(lambda: prune(engine, self.settings.loop_protection), "interval",
                              minutes=10, id="loop-counter-prune", coalesce=True,
                              max_instances=1)
            # SLA escalations (docs/sla-escalations.md): exactly-once by the database, so
            # several nodes may run this job; one at a time per process is enough. Scheduled
            # even without SLAs, so SLAs added by a reload are swept (an idle tick is one
            # index probe).
            from mailgw.sla.sweep import Sweeper

            self._sweeper = Sweeper(engine, self.settings, ctx.renderer)
            scheduler.add_job(self._sla_sweep, "interval", args=(self._sweeper, sender_wake),
                              seconds=self.settings.sla_sweep.interval, id="sla-sweep",
                              coalesce=True, max_instances=1)
            from datetime import UTC, datetime

            from mailgw.agent_commands import wake_pending_job  # #pending reminders (issue 7)

            # First run at start: reminders that fell due while the gateway was down.
            scheduler.add_job(lambda: wake_pending_job(engine, self.settings, self._ctx.renderer),  # type: ignore[union-attr]
                              "interval", minutes=1, id="pending-reminder", coalesce=True,
                              max_instances=1, next_run_time=datetime.now(UTC))
            scheduler.start()
        for t in threads:
            t.start()
        if "imap" in self.roles and self.settings.mailboxes:
            # IMAP intake: one poller thread per mailbox (mailgw/intake/imap.py).
            from mailgw.intake.imap import start_pollers

            threads += start_pollers(engine, self.settings.mailboxes, self.home.path, self.stop,
                                     on_commit=worker_wake.set)
        try:
            if "smtp" in self.roles:
                run_loop(self._serve(engine, worker_wake))
            else:
                self._wait_for_signal()
        finally:
            self.stop.set()
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, lambda *_: log.warning(
                        "already stopping: finishing work in progress (SIGKILL aborts)"))
            worker_wake.set()
            sender_wake.set()
            if pool:
                pool.stop()
            for t in threads:
                t.join()
            if scheduler:
                scheduler.shutdown(wait=True)
            engine.dispose()
            if worker_engine is not None and worker_engine is not engine:
                worker_engine.dispose()
            log.info("mailgw stopped")
        return 0

    def _reload(self) -> None:
        """SIGHUP: reload the config and the filters now, here and in the worker processes
        (off the signal handler's thread: the admin sees the result in the log at once)."""
        threading.Thread(target=self.reload, name="config-reload", daemon=True).start()
        if self._pool is not None:
            self._pool.signal(signal.SIGHUP)

    def reload(self) -> bool:
        """Read config/mailgw.yaml again and put it in force if it is valid and the filters
        compile against it; else log why and keep the running config. Then reload the
        filters. Returns whether a new config was put in force."""
        with self._reload_lock:
            applied = self._reload_config()
            # Templates are compiled once and cached (no mtime checks per mail): a new
            # renderer reads them afresh.
            renderer = Renderer(self.home.templates)
            if self._ctx is not None:
                self._ctx = replace(self._ctx, renderer=renderer)
            if self._sweeper is not None:
                self._sweeper.renderer = renderer
            if self.filters is not None and not applied:
                self.filters.request_reload()
            return applied

    def _reload_config(self) -> bool:
        if self.loader is None:
            return False
        label = display_path(self.home.config_file)
        try:
            new = self.loader()
            pipeline = (load_pipeline(self.filters.directory, new, self.filters.templates_dir,
                                      self.filters.registry)
                        if self.filters is not None else None)
        except ConfigError as exc:
            log.error("config: %s refused, keeping the running config:\n%s", label,
                      "\n".join(exc.errors))
            return False
        if new == self.settings:
            log.info("config: %s unchanged", label)
            return False
        old, self.settings = self.settings, new
        for key in RESTART_ONLY:
            if getattr(old, key, None) != getattr(new, key, None):
                log.warning("config: %s changed; it takes effect when mailgw run restarts", key)
        if self._ctx is not None:
            self._ctx = replace(self._ctx, settings=new)
        for handler in self._handlers:
            handler.settings = new
        if self._sweeper is not None:
            self._sweeper.settings = new
        if self.filters is not None and pipeline is not None:
            self.filters.settings = new
            self.filters.pipeline = pipeline
            log.info("filters: loaded %d rule(s) from %s", len(pipeline.rules),
                     self.filters.directory)
        log.info("config: reloaded %s", label)
        return True

    def _wait_for_signal(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload())
        if take_deferred():  # a SIGHUP while starting (mailgw/signals.py)
            self._reload()
        log.info("mailgw running roles %s", ", ".join(self.roles))
        settle()
        print(f"mailgw: ready ({', '.join(self.roles)})", flush=True)
        while not self.stop.wait(3600):
            pass

    @staticmethod
    def _sla_sweep(sweeper, sender_wake: threading.Event) -> None:  # type: ignore[no-untyped-def]
        try:
            result = sweeper.sweep()
        except Exception:
            # The transaction rolled back: nothing fired, the next run tries again.
            log.exception("SLA sweep failed")
            return
        if result.fired:
            log.info("SLA sweep: %d notice(s) fired", len(result.fired))
            sender_wake.set()

    @staticmethod
    def _housekeeping(engine) -> None:  # type: ignore[no-untyped-def]
        # A gateway on this host that was killed leaves leased rows behind; another one that
        # keeps running frees them here instead of after the lease (worker start does too).
        release_dead_claims(engine, own=False)
        n = pending_count(engine)
        if n:
            log.info("inbound backlog: %d message(s) pending", n)

    async def _serve(self, engine, worker_wake: threading.Event) -> None:  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopped.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        writer = GroupCommitWriter(engine, on_commit=worker_wake.set)
        servers, handlers = [], []
        listeners: list[tuple[str, Listener, bool]] = [("smtp", self.settings.smtp, False)]
        if self.settings.lmtp:
            listeners.append(("lmtp", self.settings.lmtp, True))
        try:
            for name, listener, lmtp in listeners:
                addr = self.smtp_override if (name == "smtp" and self.smtp_override) else listener.listen
                host, _, port = addr.rpartition(":")
                handler = IntakeHandler(self.settings, writer, source=name)
                factory = protocol_factory(listener, handler, self.settings.hostname, lmtp)
                try:
                    server = await loop.create_server(factory, host.strip("[]"), int(port))
                except OSError as exc:
                    raise ListenError(f"cannot listen for {name.upper()} on {addr}: "
                                      f"{exc.strerror or exc}") from None
                servers.append(server)
                handlers.append(handler)
                self._handlers.append(handler)
                log.info("mailgw listening for %s on %s", name.upper(), addr)
            if take_deferred():  # a SIGHUP while starting (mailgw/signals.py)
                self._reload()
            settle()  # started: see mailgw/gctune.py
            print(f"mailgw: ready ({', '.join(self.roles)})", flush=True)
            await stopped.wait()
            log.info("mailgw stopping")
        finally:
            for server in servers:
                server.close()
            # Let messages already in DATA be received, committed and answered before we
            # exit (at most 30 s: a client that stalls mid-DATA gets no 250 and sends again).
            for _ in range(300):
                if not writer.receiving and not any(h.in_flight for h in handlers):
                    break
                await asyncio.sleep(0.1)
            writer.close()
