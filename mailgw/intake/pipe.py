"""The lean store path of ``mailgw deliver``: one INSERT through the database driver.

An MTA pipe starts one process per message, so what that process imports is paid per
message: SQLAlchemy with the models costs about 0.25 s, more than everything else the command
does. For the two stores we ship (SQLite, and PostgreSQL through psycopg) the inbound row is
written here with the driver alone, with the same values, types and durability as
``mailgw.queue.put`` (SQLite: WAL, ``synchronous=FULL``, ``BEGIN IMMEDIATE``). Any other URL,
and a store whose schema is not at ``SCHEMA_REVISION`` (it needs migrating first), returns
None and the caller takes the full path. tests/test_hot_path.py checks both paths write the
same row on both backends.
"""

from __future__ import annotations

import hashlib
import json
from urllib.parse import unquote, urlsplit

from mailgw.types import Envelope

COLUMNS = ("received_at", "source", "source_ref", "mail_from", "rcpt_tos", "queue", "size",
           "sha256", "raw", "state", "attempts")


def inbound_row(env: Envelope) -> dict:
    """The inbound row for an envelope (shared with ``mailgw.queue``)."""
    return {
        "received_at": env.received_at,
        "source": env.source,
        "source_ref": env.source_ref,
        "mail_from": env.mail_from,
        "rcpt_tos": list(env.rcpt_tos),
        "queue": env.queue,
        "size": len(env.raw),
        "sha256": hashlib.sha256(env.raw).hexdigest(),
        "raw": env.raw,
        "state": "pending",
        "attempts": 0,
    }


def put_lean(url: str, env: Envelope, schema_revision: str) -> int | None:
    """Store one envelope durably and return its id; None: use the full (SQLAlchemy) path."""
    scheme = url.split(":", 1)[0]
    if scheme == "sqlite":
        return _put_sqlite(url, env, schema_revision)
    if scheme in ("postgresql", "postgresql+psycopg"):
        return _put_postgresql(url, env, schema_revision)
    return None


def _put_sqlite(url: str, env: Envelope, schema_revision: str) -> int | None:
    import sqlite3

    parts = urlsplit(url)
    path = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    if not path or path == ":memory:" or parts.query or parts.netloc:
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=60,
                               isolation_level=None)
    except sqlite3.OperationalError:
        return None  # no database yet: the full path creates it
    try:
        if _revision(conn) != schema_revision:
            return None
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=60000")
        row = inbound_row(env)
        # As SQLAlchemy stores them on SQLite: UTC wall time as text, JSON as text.
        row["received_at"] = row["received_at"].strftime("%Y-%m-%d %H:%M:%S.%f")
        row["rcpt_tos"] = json.dumps(row["rcpt_tos"])
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute(
                f"INSERT INTO inbound ({', '.join(COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(COLUMNS))}) RETURNING id",
                [row[c] for c in COLUMNS])
            inbound_id = cur.fetchone()[0]
            cur.close()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return inbound_id
    finally:
        conn.close()


def _put_postgresql(url: str, env: Envelope, schema_revision: str) -> int | None:
    import psycopg
    from psycopg.types.json import Json

    # libpq takes the same URI, query options (e.g. options=-csearch_path=...) included.
    conninfo = "postgresql:" + url.split(":", 1)[1]
    with psycopg.connect(conninfo, autocommit=False) as conn:
        if _revision(conn) != schema_revision:
            return None
        conn.rollback()
        row = inbound_row(env)
        row["rcpt_tos"] = Json(row["rcpt_tos"])
        cur = conn.execute(
            f"INSERT INTO inbound ({', '.join(COLUMNS)}) "
            f"VALUES ({', '.join(['%s'] * len(COLUMNS))}) RETURNING id",
            [row[c] for c in COLUMNS])
        inbound_id = cur.fetchone()[0]
        conn.commit()
        return inbound_id


def _revision(conn) -> str | None:  # type: ignore[no-untyped-def]
    try:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except Exception:  # noqa: BLE001 - no table yet: the full path migrates
        return None
    return row[0] if row else None
