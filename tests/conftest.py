"""Shared fixtures: a mailgw home, a store on SQLite and on PostgreSQL, a running gateway and
an SMTP sink. Everything is real and on loopback; nothing of SMTP or the database is mocked.

Tests that take the ``store_url`` fixture run twice, on SQLite and on PostgreSQL. PostgreSQL
is at 127.0.0.1:5432 (database ``test``, trust auth) or at ``MAILGW_TEST_PG``; each test gets
its own schema, dropped afterwards. Without a reachable server those runs are skipped, unless
``MAILGW_REQUIRE_PG=1`` (as in CI), where they fail.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path

import pytest
import yaml

PG_BASE = os.environ.get("MAILGW_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_available() -> str | None:
    try:
        import psycopg

        dsn = PG_BASE.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn, connect_timeout=3):
            return None
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


_PG_PROBLEM: str | None | bool = False


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty store: a SQLite file, or a new PostgreSQL schema."""
    global _PG_PROBLEM
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store' / 'mailgw.db'}"
        return
    if _PG_PROBLEM is False:
        _PG_PROBLEM = _pg_available()
    if _PG_PROBLEM:
        if os.environ.get("MAILGW_REQUIRE_PG") == "1":
            pytest.fail(f"PostgreSQL required but unreachable at {PG_BASE}: {_PG_PROBLEM}")
        pytest.skip(f"PostgreSQL unreachable at {PG_BASE}: {_PG_PROBLEM}")
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    dsn = PG_BASE.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_BASE else "?"
    yield f"{PG_BASE}{sep}options=-csearch_path%3D{schema}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@dataclass
class HomeDir:
    path: Path
    store_url: str

    @property
    def config_file(self) -> Path:
        return self.path / "config" / "mailgw.yaml"

    def config(self) -> dict:
        return yaml.safe_load(self.config_file.read_text())

    def write_config(self, data: dict) -> None:
        self.config_file.write_text(yaml.safe_dump(data, sort_keys=False))

    def update_config(self, **changes) -> None:
        data = self.config()
        data.update(changes)
        self.write_config(data)

    def env(self) -> dict[str, str]:
        return {**os.environ, "MAILGW_HOME": str(self.path), "MAILGW_STORE_URL": self.store_url,
                "PYTHONUNBUFFERED": "1"}

    def cli(self, *args: str, input: bytes | None = None, check: bool = False,
            timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run([sys.executable, "-m", "mailgw", *args], input=input,
                              capture_output=True, env=self.env(), timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"mailgw {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout.decode()}\n{proc.stderr.decode()}")
        return proc

    def settings(self):  # type: ignore[no-untyped-def]
        from mailgw.settings import Home, load_settings

        s = load_settings(Home(self.path))
        return s.model_copy(update={"store_url": self.store_url})

    def engine(self):  # type: ignore[no-untyped-def]
        from mailgw.store.db import make_engine, migrate

        engine = make_engine(self.store_url)
        migrate(engine)
        return engine


@pytest.fixture
def home(tmp_path: Path, store_url: str) -> HomeDir:
    """A home made by ``mailgw init`` from the shipped defaults, on the store under test."""
    from mailgw.home import init_home

    init_home(tmp_path / "home")
    h = HomeDir(tmp_path / "home", store_url)
    h.update_config(hostname="helpdesk.test")
    return h


@dataclass
class Sink:
    """A real SMTP server standing in for the relay; collects what it receives."""

    port: int
    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    # Status strings to answer DATA with before accepting (e.g. ["451 4.3.0 busy"]).
    refusals: list[str] = field(default_factory=list)

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        if self.refusals:
            return self.refusals.pop(0)
        with self.cond:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                                  envelope.original_content))
            self.cond.notify_all()
        return "250 2.0.0 OK"

    def wait_for(self, count: int, timeout: float = 30) -> list[Message]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"sink got {len(self.messages)} of {count} messages")
                self.cond.wait(left)
            return [message_from_bytes(raw) for _, _, raw in self.messages]


@pytest.fixture
def sink() -> Iterator[Sink]:
    from aiosmtpd.controller import Controller

    s = Sink(free_port())
    controller = Controller(s, hostname="127.0.0.1", port=s.port)
    controller.start()
    yield s
    controller.stop()


@dataclass
class Gateway:
    home: HomeDir
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def start(self, *extra: str, timeout: float = 30, workers: str | None = "0") -> Gateway:
        """``workers``: the ``--workers`` given unless ``extra`` has one; "0" (the worker as a
        thread: one process fewer to start in each of the suite's gateways) unless a test
        asks for another, or for None: ``mailgw run``'s default (``worker.processes``,
        ``auto``: tests/test_worker_processes.py)."""
        if workers is not None and "--workers" not in extra:
            extra = (*extra, "--workers", workers)
        self.log = self.home.path / f"gateway-{time.monotonic_ns()}.log"
        out = open(self.log, "wb")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailgw", "run", "--smtp", f"127.0.0.1:{self.port}", *extra],
            stdout=out, stderr=subprocess.STDOUT, env=self.home.env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}:\n{self.output()}")
            if b"mailgw: ready" in self.log.read_bytes():
                return self
            time.sleep(0.05)
        raise AssertionError(f"gateway not ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # What it waits for: every thread's stack into the log (mailgw/signals.py).
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1)
            self.proc.kill()
            raise AssertionError(f"gateway did not stop on signal {sig}:\n{self.output()}") from None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def gateway(home: HomeDir) -> Iterator[Gateway]:
    """A ``mailgw run`` process on a free port (call ``.start()``); stopped after the test."""
    gw = Gateway(home, free_port())
    yield gw
    if gw.proc is not None and gw.proc.poll() is None:
        gw.stop()


def wait_until(predicate, timeout: float = 30, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# The real Dovecot for the IMAP intake tests (session-scoped; skipped when not installed).
from tests.imap_server import dovecot_server, dovecot_without_tls, imap_user  # noqa: E402, F401
