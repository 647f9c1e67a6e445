"""Engine set-up for SQLite (embedded default) and PostgreSQL (production, several nodes).

SQLite runs in WAL mode with ``synchronous=FULL``: in WAL mode ``NORMAL`` may lose the last
commits on power loss, and a ``250`` must only follow a commit that survives one. Write
transactions start with ``BEGIN IMMEDIATE`` so two writers queue on the lock instead of failing
with "database is locked" half-way through.

The worker's engine alone is made with ``synchronous="NORMAL"`` (its commits are not fsynced;
the next FULL commit of any other connection, or a checkpoint, syncs the WAL they are in):
every consequence of a worker's commit that leaves the store is preceded by such a commit,
and a worker commit lost to a power cut is only processed again (docs/architecture.md,
decision 36).
"""

from __future__ import annotations

import threading
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
SCHEMA_REVISION = "0020"
_migrate_lock = threading.Lock()


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(url: str, *, pool_size: int = 5, synchronous: str = "FULL") -> Engine:
    """``synchronous``: SQLite's PRAGMA on this engine's connections, ``FULL`` (every commit
    fsynced: the default, and the only choice for anything that answers a client or sends
    mail) or ``NORMAL`` (the worker's engine only: decision 36). Ignored on PostgreSQL."""
    from sqlalchemy import create_engine, event
    from sqlalchemy.engine import make_url

    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
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
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # type: ignore[no-untyped-def]
            mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=10, pool_pre_ping=True)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    from sqlalchemy.orm import sessionmaker

    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    """A session for reading only (SQLite: a deferred BEGIN that takes no write lock)."""
    from sqlalchemy.orm import Session

    conn = engine.connect().execution_options(sqlite_begin="DEFERRED")
    try:
        if engine.dialect.name != "postgresql":
            with Session(bind=conn) as s:
                yield s
            return
        # PostgreSQL: ended with COMMIT, not ROLLBACK (the same for a transaction that wrote
        # nothing). psycopg forgets every statement it prepared on the connection after a
        # rollback (DEALLOCATE ALL): the worker's read of each batch made its store
        # transaction parse and plan all its statements again (bench/RESULTS.md, issue 8
        # session 7). An error rolls back as before.
        trans = conn.begin()
        with Session(bind=conn) as s:
            yield s
        trans.commit()
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
