"""Engine set-up for SQLite (embedded default) and PostgreSQL (production, several nodes).

SQLite runs in WAL mode with ``synchronous=FULL``: in WAL mode ``NORMAL`` may lose the last
commits on power loss, and a ``250`` must only follow a commit that survives one. Write
transactions start with ``BEGIN IMMEDIATE`` so two writers queue on the lock instead of failing
with "database is locked" half-way through.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

# SQLAlchemy is imported where it is used: `mailgw deliver` reads SCHEMA_REVISION from here
# and, on its lean path (mailgw/intake/pipe.py), never needs SQLAlchemy at all.
if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"
# The newest Alembic revision. Compared on every start (``mailgw deliver`` runs once per
# message), so Alembic itself is imported only when the schema really needs upgrading;
# tests/test_migrations.py keeps this equal to the real head.
SCHEMA_REVISION = "0015"
_migrate_lock = threading.Lock()


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


# WAL checkpoints in a gateway (decision 33): the writers' own automatic checkpoint is moved
# this far out, as a bound should the checkpointer thread fall behind (pages of 4 KiB)...
GATEWAY_AUTOCHECKPOINT = 32768
# ... and WalCheckpointer copies the WAL into the database every CHECKPOINT_INTERVAL seconds,
# and restarts the WAL from its start once it has grown past RESTART_PAGES.
CHECKPOINT_INTERVAL = 0.25
RESTART_PAGES = 8192
RESTART_WAIT = 0.25  # seconds a RESTART may wait for the write lock and for readers
# A WAL file that grew past this (a run of large messages) is truncated back to it when the
# WAL next starts over.
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024


def make_engine(url: str, *, pool_size: int = 5, wal_autocheckpoint: int | None = None) -> Engine:
    """The store's engine. ``wal_autocheckpoint`` (SQLite): the pages after which a
    connection that commits also checkpoints the WAL; None keeps SQLite's 1000. A gateway
    passes ``GATEWAY_AUTOCHECKPOINT`` and runs a ``WalCheckpointer`` instead."""
    from sqlalchemy import create_engine, event
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            # Take transaction control from the sqlite3 module so BEGIN IMMEDIATE is possible.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            if wal_autocheckpoint is not None:
                cur.execute(f"PRAGMA wal_autocheckpoint={int(wal_autocheckpoint)}")
                cur.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # type: ignore[no-untyped-def]
            mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=10, pool_pre_ping=True)


class WalCheckpointer:
    """Copies SQLite's WAL into the database file from a thread of its own (decision 33).

    SQLite checkpoints in whichever connection commits once the WAL holds 1000 pages: in a
    gateway that was the intake writer (its next group waiting, its sessions' ``250``
    too), a worker between batches or the sender. Under a steady load the WAL is never
    fully copied when the next writer starts, so it cannot start over, stays above 1000
    pages, and every commit then checkpointed the few pages it had added, each time with
    an fsync of the database file (the raw mail goes through the WAL three times: the
    intake, the claim and the ``done`` mark rewrite the row). Here one thread does a
    ``PASSIVE`` checkpoint every ``interval``: it takes no write lock, so writers and
    readers go on meanwhile, and copies each page once per interval however often it was
    written. When the WAL has grown past ``restart_pages`` it asks for a ``RESTART``
    after the passive copy (what is left to copy then is small): that waits for the
    write lock and for readers of the old WAL, so the next commit writes the WAL from its
    start again; ``journal_size_limit`` then gives back what a run of large messages made
    it grow. The writers keep an automatic checkpoint as a bound, at
    ``GATEWAY_AUTOCHECKPOINT`` pages. Durability is unchanged: a commit is durable once
    its WAL frames are synced (``synchronous=FULL``); a checkpoint only moves pages that
    are durable already, and syncs the database file before the WAL may be reused.
    """

    def __init__(self, engine: Engine, *, interval: float = CHECKPOINT_INTERVAL,
                 restart_pages: int = RESTART_PAGES):
        self.engine = engine
        self.interval = interval
        self.restart_pages = restart_pages
        self.passes = self.restarts = 0
        self._restart_after = 0.0

    def checkpoint(self, conn) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
        """One pass on a ``sqlite3`` connection: (busy, WAL pages, pages copied)."""
        row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.passes += 1
        if row[1] >= self.restart_pages and time.monotonic() >= self._restart_after:
            # The write lock, and then the readers of the WAL: waited for RESTART_WAIT at
            # most (a long reader, a report, must not stop the writers for long); tried
            # again a few passes later.
            row = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            self.restarts += 1
            if row[0]:
                self._restart_after = time.monotonic() + 8 * self.interval
        return tuple(row)  # type: ignore[return-value]

    def run(self, stop: threading.Event) -> None:
        import logging

        log = logging.getLogger(__name__)
        raw = self.engine.raw_connection()
        conn = raw.driver_connection
        raw.detach()  # its own busy timeout: not back to the pool
        try:
            conn.execute(f"PRAGMA busy_timeout={int(RESTART_WAIT * 1000)}")
            while not stop.wait(self.interval):
                try:
                    self.checkpoint(conn)
                except Exception:  # noqa: BLE001 - the writers' automatic checkpoint is the bound
                    log.warning("WAL checkpoint failed", exc_info=True)
        finally:
            raw.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    from sqlalchemy.orm import sessionmaker

    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    """A session for reading only (SQLite: a deferred BEGIN that takes no write lock)."""
    from sqlalchemy.orm import Session

    conn = engine.connect().execution_options(sqlite_begin="DEFERRED")
    try:
        with Session(bind=conn) as s:
            yield s
    finally:
        conn.close()


def _alembic_config(engine: Engine):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()  # type: ignore[arg-type]


def current_revision(engine: Engine) -> str | None:
    from sqlalchemy import text

    with read_session(engine) as s:
        try:
            return s.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except Exception:
            return None


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (Alembic); cheap when it already is."""
    from sqlalchemy import text

    with _migrate_lock:
        if current_revision(engine) == SCHEMA_REVISION:
            return
        from alembic import command
        if engine.dialect.name == "postgresql":
            # Two gateway nodes starting at once must not both create the tables.
            with engine.begin() as conn:
                conn.execute(text("SELECT pg_advisory_xact_lock(727274)"))
                cfg = _alembic_config(engine)
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        else:
            command.upgrade(_alembic_config(engine), "head")
