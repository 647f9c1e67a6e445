"""The lean store path of ``mailgw deliver``: one INSERT through the database driver.

An MTA pipe starts one process per message, so what that process imports is paid per
message: SQLAlchemy with the models costs about 0.25 s, more than everything else the command
does. For the two stores we ship (SQLite, and PostgreSQL through psycopg) the inbound row is
written here with the driver alone, with the same values, types and durability as
``mailgw.queue.put`` (SQLite: WAL, ``synchronous=FULL``, ``BEGIN IMMEDIATE``). Any other URL,
and a store whose schema is not at ``SCHEMA_REVISION`` (it needs migrating first), returns
None and the caller takes the full path. tests/test_hot_path.py checks both paths write the
same row on both backends.

The raw bytes go into ``inbound_raw`` (decision 35), in the same transaction as the inbound
row: on SQLite two INSERTs, on PostgreSQL one statement (the row's INSERT in a WITH clause).

A large message (``LARGE`` bytes or more) is read into a ``RawBuffer`` and, on SQLite, written
into its ``inbound_raw`` row in pieces, its memory let go as soon as the bytes are in
(``write_large``): this is what keeps ``mailgw deliver`` and SMTP intake of a 25 MB message
under 3x its size in RSS (bench/RESULTS.md).
"""

from __future__ import annotations

import hashlib
import json
import re
from urllib.parse import unquote, urlsplit

from mailgw.mail.ids import id_fits
from mailgw.types import Envelope

# A message this large is held in a RawBuffer and written to SQLite piece by piece.
LARGE = 1 << 20
PIECE = 1 << 20  # bytes per incremental blob write
_READ = 1 << 20  # bytes per read of standard input

# The inbound row's columns (``inbound_row`` has "raw" too: it goes into inbound_raw).
COLUMNS = ("received_at", "source", "source_ref", "mail_from", "rcpt_tos", "queue", "size",
           "sha256", "state", "attempts", "message_id")

# message_id_of: the header block ends at the first empty line; a Message-ID field there,
# with its continuation lines. Only the first HEAD_LIMIT bytes are looked at.
HEAD_LIMIT = 256 * 1024
_HEAD_END = re.compile(rb"\n\r?\n")
_MESSAGE_ID_FIELD = re.compile(rb"^message-id:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)",
                               re.IGNORECASE | re.MULTILINE)
_BRACKETED_ID = re.compile(r"<([^<>]*)>")
_ID_SEPARATORS = re.compile(r"[\s<>,;()\"']+")


class RawBuffer(bytearray):
    """A large message's bytes, handed over to the store, which empties the buffer once the
    bytes are in the database (``write_large``).

    Why (SQLite): SQLite builds a row in memory before writing it and binds a parameter as a
    copy of its own, so a plain INSERT of a 25 MB value costs 2x its size on top of the
    caller's 1x. A ``zeroblob(n)`` costs nothing when no column after it has data bytes in
    the record: ``raw`` is the last column of ``inbound_raw`` (its key is the rowid, kept out
    of the record). So the ``inbound_raw`` row is inserted with a zero blob, the bytes are
    written into it in pieces (incremental blob I/O) and the buffer is emptied; nothing
    rewrites that row afterwards (before decision 35 the bytes were in the inbound row and an
    UPDATE of it made SQLite's 2x). All of it is in the caller's transaction with the inbound
    row: a crash half-way leaves neither.
    """

    consumed = False  # True once the bytes went to the store: it cannot be written twice

    def consume(self) -> None:
        """Let go of the bytes (they are in the row now)."""
        del self[:]
        self.consumed = True


def read_message(stream) -> bytes | RawBuffer:  # type: ignore[no-untyped-def]
    """A message read to its end from a binary stream (``mailgw deliver``'s standard input):
    ``bytes`` when small, else a ``RawBuffer`` (grown in place, never held twice)."""
    first = stream.read(LARGE)
    if len(first) < LARGE:
        return first  # a short read of a buffered stream is the end of it
    buf = RawBuffer(first)
    del first
    while chunk := stream.read(_READ):
        buf += chunk
    return buf


def _check(raw: bytes) -> None:
    if isinstance(raw, RawBuffer) and raw.consumed:
        raise RuntimeError("this message's bytes were handed to the store already")


def write_large(dbapi_conn, inbound_id: int, raw: RawBuffer) -> None:  # type: ignore[no-untyped-def]
    """Store ``raw`` as inbound message ``inbound_id``'s raw mail (its ``inbound_raw`` row,
    inserted here as a zero blob and filled in pieces), then let go of ``raw``: inside the
    caller's SQLite transaction, on its ``sqlite3`` connection. See ``RawBuffer``."""
    dbapi_conn.execute("INSERT INTO inbound_raw (inbound_id, raw) VALUES (?, zeroblob(?))",
                       (inbound_id, len(raw)))
    with dbapi_conn.blobopen("inbound_raw", "raw", inbound_id) as blob:
        _write_pieces(blob, raw)
    raw.consume()


def _write_pieces(blob, raw: RawBuffer) -> None:  # type: ignore[no-untyped-def]
    with memoryview(raw) as view:
        for start in range(0, len(view), PIECE):
            blob.write(view[start:start + PIECE])


def message_id_of(raw: bytes | bytearray) -> str | None:
    """The bare Message-ID of a message, read from its header block without parsing it: what
    ``mailgw.mail.parse`` gives as ``ParsedMail.message_id`` (the first Message-ID field, its
    first bracketed id with the spaces taken out, else a token with an "@", else the value
    without brackets if it is one word; tests/test_thread_hold.py compares the two on the
    corpora). None when there is none, or it could never be referred to (a NUL, or longer
    than 998 bytes: ``mailgw.mail.ids``; ``mailgw.threader.message_refs`` drops such
    references). A few
    microseconds: the intake stores it so the worker can hold a reply back while its
    original is still in the queue (docs/architecture.md, decision 31)."""
    end = _HEAD_END.search(raw, 0, HEAD_LIMIT)
    found = _MESSAGE_ID_FIELD.search(raw, 0, end.start() + 1 if end else min(len(raw), HEAD_LIMIT))
    if found is None:
        return None
    value = found.group(1)
    text = (value.decode("ascii") if value.isascii()
            else value.decode("utf-8", "replace")).replace("\r", "").replace("\n", "").strip()
    if not text:
        return None
    ids = ["".join(i.split()) for i in _BRACKETED_ID.findall(text)]
    mid = next((i for i in ids if i), None)
    if mid is None:
        mid = next((t for t in _ID_SEPARATORS.split(text) if "@" in t.strip("@")), None)
    if mid is None:
        token = text.strip("<> \t")
        mid = token if token and not any(c.isspace() for c in token) else None
    if mid is None or not id_fits(mid):
        return None
    return mid


def inbound_row(env: Envelope) -> dict:
    """The inbound row for an envelope (shared with ``mailgw.queue``): the values of
    ``COLUMNS``, and "raw", the message, which goes into ``inbound_raw``."""
    _check(env.raw)
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
        "message_id": message_id_of(env.raw),
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
        conn.execute("BEGIN IMMEDIATE")
        try:
            inbound_id = sqlite_insert(conn, env)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return inbound_id
    finally:
        conn.close()


_SQLITE_INSERT = (f"INSERT INTO inbound ({', '.join(COLUMNS)}) "
                  f"VALUES ({', '.join('?' * len(COLUMNS))}) RETURNING id")
_SQLITE_INSERT_RAW = "INSERT INTO inbound_raw (inbound_id, raw) VALUES (?, ?)"


def sqlite_insert(dbapi_conn, env: Envelope) -> int:  # type: ignore[no-untyped-def]
    """One envelope's inbound row and its raw mail (``inbound_raw``) on a ``sqlite3``
    connection, in the caller's transaction (``mailgw deliver`` here; ``mailgw.queue``'s
    ``put_in``). The values are stored as SQLAlchemy stores them
    (tests/test_intake_rows.py compares the rows)."""
    return sqlite_insert_values(dbapi_conn, env, sqlite_values(env))


def sqlite_values(env: Envelope) -> list:  # type: ignore[type-arg]
    """The inbound row's values (``COLUMNS``' order) as SQLAlchemy stores them on SQLite: the
    datetime's wall time as text, JSON as text. No database needed: the intake writer builds
    them (the SHA-256, the Message-ID) before it takes the write lock (``BEGIN IMMEDIATE``),
    so the lock is held for the inserts and the commit only."""
    row = inbound_row(env)
    row["received_at"] = row["received_at"].strftime("%Y-%m-%d %H:%M:%S.%f")
    row["rcpt_tos"] = json.dumps(row["rcpt_tos"])
    return [row[c] for c in COLUMNS]


def sqlite_insert_values(dbapi_conn, env: Envelope, values: list) -> int:  # type: ignore[no-untyped-def, type-arg]
    """``sqlite_insert`` with the row's values already built (``sqlite_values(env)``)."""
    cur = dbapi_conn.execute(_SQLITE_INSERT, values)
    inbound_id = cur.fetchone()[0]
    cur.close()
    if isinstance(env.raw, RawBuffer):
        write_large(dbapi_conn, inbound_id, env.raw)
    else:
        dbapi_conn.execute(_SQLITE_INSERT_RAW, (inbound_id, env.raw))
    return inbound_id


def _pg_insert(placeholders: list[str]) -> str:
    """One statement for an inbound row and its raw mail (the last placeholder): the row's
    INSERT in a WITH clause, the ``inbound_raw`` INSERT reading its id; the id returned."""
    return (f"WITH i AS (INSERT INTO inbound ({', '.join(COLUMNS)}) "
            f"VALUES ({', '.join(placeholders[:-1])}) RETURNING id) "
            f"INSERT INTO inbound_raw (inbound_id, raw) SELECT id, {placeholders[-1]}::bytea FROM i "
            "RETURNING inbound_id")


_PG_INSERT = _pg_insert(["%s"] * (len(COLUMNS) + 1))


def pg_insert_many(dbapi_conn, envelopes: list[Envelope]) -> list[int]:  # type: ignore[no-untyped-def]
    """Small envelopes' inbound rows on a ``psycopg`` connection, in the caller's
    transaction: one INSERT a row, sent together (psycopg's pipeline), ids in the order of
    the envelopes. The values as ``mailgw deliver`` writes them (tests/test_intake_rows.py)."""
    from psycopg.types.json import Json

    params = []
    for env in envelopes:
        row = inbound_row(env)
        row["rcpt_tos"] = Json(row["rcpt_tos"])
        params.append([*(row[c] for c in COLUMNS), row["raw"]])
    ids: list[int] = []
    with dbapi_conn.cursor() as cur:
        cur.executemany(_PG_INSERT, params, returning=True)
        while True:
            ids.append(cur.fetchone()[0])
            if not cur.nextset():
                break
    return ids


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
        if isinstance(env.raw, RawBuffer):
            return _insert_pg_large(conn, row)
        row["rcpt_tos"] = Json(row["rcpt_tos"])
        cur = conn.execute(_PG_INSERT, [*(row[c] for c in COLUMNS), row["raw"]])
        inbound_id = cur.fetchone()[0]
        conn.commit()
        return inbound_id


def _insert_pg_large(conn, row: dict) -> int:  # type: ignore[no-untyped-def]
    """The row of a large message and its raw mail (one statement, ``_pg_insert``) through
    libpq alone, committed when it returns.

    psycopg's own adaptation copies a binary parameter once more before libpq copies it into
    its output buffer: for a 25 MB message that is the difference between 2x and 3x its size
    (bench/RESULTS.md). Here ``raw`` goes to libpq as it is, in binary, and every other value
    as text, as the server reads it. Outside an explicit transaction the INSERT commits (and
    is flushed, ``synchronous_commit``) before the server answers, as ``commit()`` would."""
    from psycopg import DatabaseError, pq

    encoding = conn.info.encoding
    names = (*COLUMNS, "raw")
    params: list[bytes | bytearray | None] = []
    for name in names:
        value = row[name]
        if name == "raw" or value is None:
            params.append(value)
        elif name == "received_at":
            params.append(value.isoformat().encode())
        elif name == "rcpt_tos":
            params.append(json.dumps(value).encode(encoding))
        else:
            params.append(str(value).encode(encoding))
    res = conn.pgconn.exec_params(
        _pg_insert([f"${i}" for i in range(1, len(names) + 1)]).encode(),
        params, param_formats=[int(name == "raw") for name in names])
    if res.status != pq.ExecStatus.TUPLES_OK:
        raise DatabaseError(res.error_message.decode(encoding, "replace").strip()
                            or f"INSERT of the inbound row failed ({res.status})")
    return int(res.get_value(0, 0))


def _revision(conn) -> str | None:  # type: ignore[no-untyped-def]
    try:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except Exception:  # noqa: BLE001 - no table yet: the full path migrates
        return None
    return row[0] if row else None
