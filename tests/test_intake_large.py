"""A large message at the intake: held once, written into its row in pieces on SQLite, and
still durable before the ``250`` (or deliver's exit 0), exactly as a small one.

``mailgw.intake.pipe.RawBuffer`` carries a message of ``LARGE`` bytes or more from the SMTP
``DATA`` reader and from ``mailgw deliver``'s standard input to the store, which on SQLite
inserts the row with a zero blob and ``state = ''``, writes the bytes by incremental blob
I/O, empties the buffer and only then sets ``state = 'pending'``, all in one transaction.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import random
import smtplib
import sqlite3
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.conftest import HomeDir, wait_until
from tests.helpers import envelope, mail


def _big(size: int, seed: int = 3) -> bytes:
    """About ``size`` bytes of mail whose body has lines that start with a dot, lines that
    end with one, lines longer than a DATA piece and CRLFs that fall on piece boundaries."""
    rnd = random.Random(seed)
    out = [b"From: Big <big@customer.test>\r\nTo: support@example.com\r\n"
           b"Subject: large\r\nMessage-ID: <large@customer.test>\r\n\r\n"]
    total = 0
    while total < size:
        kind = rnd.random()
        if kind < 0.2:
            line = b"." * rnd.randint(1, 3) + rnd.randbytes(rnd.randint(0, 40)).hex().encode()
        elif kind < 0.4:
            line = rnd.randbytes(rnd.randint(0, 40)).hex().encode() + b"."
        elif kind < 0.405:  # longer than READ_PIECE: read in pieces cut anywhere
            line = b"x" * rnd.randint(256 * 1024 - 3, 300_000)
        else:
            line = rnd.randbytes(rnd.randint(0, 38)).hex().encode()
        out.append(line + b"\r\n")
        total += len(line) + 2
    return b"".join(out)


def _rows(engine, *ids: int) -> dict:  # type: ignore[no-untyped-def]
    from mailgw.store import models as m

    with engine.connect() as c:
        return {r.id: r for r in c.execute(
            select(m.Inbound.id, m.Inbound.raw, m.Inbound.size, m.Inbound.sha256,
                   m.Inbound.state).where(m.Inbound.id.in_(ids)))}


# --- the DATA reader ----------------------------------------------------------------------


def test_unstuffing_piece_by_piece_equals_unstuffing_the_whole():
    from mailgw.intake.smtp import _unstuff

    rnd = random.Random(11)
    for _ in range(2000):
        # a stuffed stream made of the bytes that matter, cut at random places
        stream = bytes(rnd.choice(b"\r\n.x") for _ in range(rnd.randint(0, 40)))
        whole = (b"\r\n" + stream).replace(b"\r\n.", b"\r\n")[2:]
        cuts = sorted(rnd.sample(range(len(stream) + 1), min(len(stream) + 1, rnd.randint(0, 6))))
        got, before, start = b"", b"\r\n", 0
        for end in [*cuts, len(stream)]:
            piece = stream[start:end]
            got += _unstuff(before, piece)
            before = (before + piece[-2:])[-2:]
            start = end
        assert got == whole, (stream, cuts)


def test_large_message_reaches_the_handler_once_as_sent(tmp_path):
    from aiosmtpd.controller import Controller

    from mailgw.intake.pipe import LARGE, RawBuffer
    from mailgw.intake.smtp import protocol_factory
    from mailgw.settings import Listener
    from tests.conftest import free_port

    got: list[bytes] = []

    class Capture:
        async def handle_DATA(self, server, session, env):  # type: ignore[no-untyped-def]
            got.append(env.original_content)
            return "250 2.0.0 OK"

    class Server(Controller):
        def factory(self):  # type: ignore[no-untyped-def]
            return protocol_factory(Listener(listen="127.0.0.1:1", max_message_size=20_000_000),
                                    handler, "t", False)()

    handler = Capture()
    port = free_port()
    server = Server(handler, hostname="127.0.0.1", port=port)
    server.start()
    messages = [_big(3_000_000, seed) for seed in range(3)] + [_big(10_000, 9)]
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            for raw in messages:  # smtplib dot-stuffs them
                assert s.sendmail("big@customer.test", ["support@example.com"], raw) == {}
    finally:
        server.stop()
    # Each arrives byte for byte as sent, the large ones as a RawBuffer, the small as bytes
    assert got == messages
    assert [type(g) for g in got] == [RawBuffer, RawBuffer, RawBuffer, bytes]
    assert len(messages[0]) >= LARGE > len(messages[-1])
    assert sum(m.count(b"\r\n.") for m in messages[:3]) > 1000  # dots to unstuff


# --- the store ----------------------------------------------------------------------------


def test_large_and_small_messages_in_one_group_keep_their_ids_and_bytes(home):
    from mailgw.intake.pipe import RawBuffer
    from mailgw.queue import put_many

    engine = home.engine()
    big1, big2 = _big(2_500_000, 1), _big(1_200_000, 2)
    small = [mail(f"small {i}", msgid=f"s{i}@c") for i in range(3)]
    envs = [envelope(small[0]), envelope(RawBuffer(big1)), envelope(small[1]),
            envelope(RawBuffer(big2)), envelope(small[2])]
    ids = put_many(engine, envs)
    rows = _rows(engine, *ids)
    engine.dispose()
    for inbound_id, raw in zip(ids, [small[0], big1, small[1], big2, small[2]], strict=True):
        row = rows[inbound_id]
        assert row.raw == raw and row.size == len(raw)
        assert row.sha256 == hashlib.sha256(raw).hexdigest() and row.state == "pending"
    sqlite = home.store_url.startswith("sqlite")
    # On SQLite the buffers were emptied once their bytes were in the rows
    assert [len(e.raw) == 0 for e in envs[1::2]] == [sqlite, sqlite]


def test_a_handed_over_buffer_is_never_written_twice(home):
    from mailgw.intake.pipe import RawBuffer
    from mailgw.queue import put

    if not home.store_url.startswith("sqlite"):
        pytest.skip("the buffer is emptied on SQLite only")
    engine = home.engine()
    env = envelope(RawBuffer(_big(1_100_000)))
    put(engine, env)
    # An empty message in its place would be a lost message: it is refused instead
    with pytest.raises(RuntimeError, match="handed to the store already"):
        put(engine, env)
    engine.dispose()


def test_group_writer_commits_a_large_message_apart_from_a_failing_one(home):
    from mailgw.intake.pipe import RawBuffer
    from mailgw.queue import GroupCommitWriter, _answer

    engine = home.engine()
    writer = GroupCommitWriter(engine)
    big = _big(1_500_000, 4)
    good = mail("fine", msgid="fine@c")
    bad = dataclasses.replace(envelope(b"Subject: bad\r\n\r\nx\r\n"), source=None)
    group: list = [(envelope(RawBuffer(big)), Future()), (bad, Future()),
                   (envelope(good), Future())]
    # When one group holds a large message and one the database refuses (source NULL)
    answers: list = []
    writer._commit(group, answers)
    writer.close()
    _answer(answers)
    # Then the refused one alone fails; the large one and the small one are stored intact
    with pytest.raises(Exception):  # noqa: B017 - the driver's integrity error
        group[1][1].result(0)
    ids = [group[0][1].result(0), group[2][1].result(0)]
    rows = _rows(engine, *ids)
    engine.dispose()
    assert [rows[i].raw for i in ids] == [big, good]


def test_large_message_over_smtp_is_durable_at_250_and_processed(home, gateway):
    from mailgw.store import models as m

    gateway.start()
    att = random.Random(5).randbytes(1_600_000)
    raw = (b"From: Big <big@customer.test>\r\nTo: support@example.com\r\nSubject: logs\r\n"
           b"Message-ID: <logs@customer.test>\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: text/plain\r\n\r\n.The logs.\r\n--b\r\n"
           b"Content-Type: application/zip; name=l.zip\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n"
           + base64.encodebytes(att).replace(b"\n", b"\r\n") + b"--b--\r\n")
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=60) as s:
        s.ehlo()
        assert s.mail("big@customer.test")[0] == 250
        assert s.rcpt("support@example.com")[0] == 250
        code, reply = s.data(raw)
    assert code == 250, reply
    inbound_id = int(reply.split()[-1])
    # The 250 came after the commit: another connection reads the whole message at once
    engine = home.engine()
    row = _rows(engine, inbound_id)[inbound_id]
    assert row.raw == raw and row.sha256 == hashlib.sha256(raw).hexdigest()
    assert row.state in ("pending", "done")
    wait_until(lambda: _rows(engine, inbound_id)[inbound_id].state == "done",
               timeout=60, what="the large message processed")
    with engine.connect() as c:
        stored = c.execute(select(m.Attachment.data)).scalars().all()
    engine.dispose()
    assert stored == [att]


def test_deliver_stores_a_large_message_whole(home):
    from mailgw.store import models as m

    raw = _big(2_200_000, 6)
    proc = home.cli("deliver", "--sender", "big@customer.test",
                    "--recipient", "support@example.com", input=raw)
    assert proc.returncode == 0, proc.stderr
    engine = home.engine()
    with engine.connect() as c:
        row = c.execute(select(m.Inbound.raw, m.Inbound.size, m.Inbound.state)).one()
    engine.dispose()
    assert row.raw == raw and row.size == len(raw) and row.state == "pending"


def test_lean_and_full_paths_write_the_same_row_for_a_large_message(home):
    from datetime import UTC, datetime

    from mailgw.intake.pipe import RawBuffer, put_lean
    from mailgw.queue import put
    from mailgw.store import models as m
    from mailgw.store.db import SCHEMA_REVISION
    from mailgw.types import Envelope

    raw = _big(1_400_000, 10) + b"\xff\x00 8-bit\r\n"

    def env() -> Envelope:
        return Envelope(raw=RawBuffer(raw), mail_from="jürgen@customer.test",
                        rcpt_tos=("support@example.com", "billing@example.com"),
                        source="pipe", received_at=datetime(2026, 11, 27, 3, 0, 1, 654321,
                                                            tzinfo=UTC), queue="billing")

    engine = home.engine()
    full = put(engine, env())
    lean = put_lean(home.store_url, env(), SCHEMA_REVISION)
    assert lean is not None and lean != full
    cols = [c for c in m.Inbound.__table__.columns if c.name != "id"] + [m.Inbound.raw]
    with engine.connect() as c:
        rows = {r.id: tuple(r[1:]) for r in c.execute(
            select(m.Inbound.id, *cols).where(m.Inbound.id.in_([full, lean])))}
    engine.dispose()
    assert rows[full] == rows[lean]
    assert rows[lean][-1] == raw
    assert rows[lean][[c.name for c in cols].index("state")] == "pending"


def test_large_row_refused_by_postgresql_raises_and_stores_nothing(home):
    import psycopg

    from mailgw.intake.pipe import RawBuffer, _insert_pg_large, inbound_row
    from mailgw.store import models as m

    if not home.store_url.startswith("postgresql"):
        pytest.skip("the libpq path is PostgreSQL's")
    engine = home.engine()  # migrated
    row = inbound_row(envelope(RawBuffer(_big(1_100_000, 12))))
    row["source"] = None  # NOT NULL: the server refuses the row
    with psycopg.connect("postgresql:" + home.store_url.split(":", 1)[1]) as conn:
        with pytest.raises(psycopg.DatabaseError, match="null value"):
            _insert_pg_large(conn, row)
    with engine.connect() as c:
        assert c.execute(select(m.Inbound.id)).first() is None
    engine.dispose()


def test_read_message_returns_bytes_when_small_and_a_buffer_when_large():
    import io

    from mailgw.intake.pipe import LARGE, RawBuffer, read_message

    for size in (0, 10, LARGE - 1, LARGE, LARGE + 1, 3 * LARGE + 17):
        data = random.Random(size).randbytes(size)
        got = read_message(io.BufferedReader(io.BytesIO(data), buffer_size=8192))
        assert got == data
        assert type(got) is (RawBuffer if size >= LARGE else bytes)


# --- a crash half-way ---------------------------------------------------------------------

CRASH = r"""
import os, sys
from datetime import UTC, datetime
import mailgw.intake.pipe as pipe
from mailgw.types import Envelope

real = pipe._write_pieces
def crash(blob, raw):
    blob.write(memoryview(raw)[:pipe.PIECE])  # one piece of the bytes, then the process dies
    os._exit(9)
pipe._write_pieces = crash
raw = pipe.RawBuffer(b"Subject: crash\r\n\r\n" + b"x" * (3 * pipe.LARGE) + b"\r\n")
env = Envelope(raw=raw, mail_from="a@c.test", rcpt_tos=("support@example.com",),
               source="pipe", received_at=datetime.now(UTC))
url = sys.argv[2]
if sys.argv[1] == "lean":
    from mailgw.store.db import SCHEMA_REVISION
    pipe.put_lean(url, env, SCHEMA_REVISION)
else:
    from mailgw.queue import put
    from mailgw.store.db import make_engine
    put(make_engine(url), env)
sys.exit("not reached")
"""


@pytest.fixture
def sqlite_home(tmp_path: Path) -> HomeDir:
    from mailgw.home import init_home

    init_home(tmp_path / "home")
    return HomeDir(tmp_path / "home", f"sqlite:///{tmp_path / 'store' / 'mailgw.db'}")


@pytest.mark.parametrize("path", ["lean", "sqlalchemy"])
def test_crash_while_the_bytes_are_written_leaves_no_row(sqlite_home, path):
    from mailgw.queue import put

    engine = sqlite_home.engine()  # migrated
    [before] = [put(engine, envelope(mail("before", msgid="b@c")))]
    # When a process dies with the zero-blob row inserted and one piece of its bytes written
    proc = subprocess.run([sys.executable, "-c", CRASH, path, sqlite_home.store_url],
                          capture_output=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    # Then no part of that message is visible, pending or otherwise, and the store is sound
    db = sqlite_home.store_url.removeprefix("sqlite:///")
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT id, state FROM inbound").fetchall() == [(before, "pending")]
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    c.close()
    # and the next message is stored as usual
    after = put(engine, envelope(mail("after", msgid="a@c")))
    assert after > before
    engine.dispose()


def test_failure_while_the_bytes_are_written_rolls_back_and_keeps_the_buffer(sqlite_home,
                                                                            monkeypatch):
    import mailgw.intake.pipe as pipe
    from mailgw.queue import put

    engine = sqlite_home.engine()

    def fail(blob, raw):  # type: ignore[no-untyped-def]
        blob.write(memoryview(raw)[:pipe.PIECE])
        raise OSError("disk full")

    raw = _big(1_300_000, 8)
    env = envelope(pipe.RawBuffer(raw))
    monkeypatch.setattr(pipe, "_write_pieces", fail)
    with pytest.raises(OSError, match="disk full"):
        put(engine, env)
    monkeypatch.undo()
    # Nothing was committed, and the bytes are still there for the retry
    with engine.connect() as c:
        assert c.exec_driver_sql("SELECT count(*) FROM inbound").scalar() == 0
    assert env.raw == raw
    [inbound_id] = [put(engine, env)]
    assert _rows(engine, inbound_id)[inbound_id].raw == raw
    engine.dispose()
