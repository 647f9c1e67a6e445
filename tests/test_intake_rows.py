"""The intake's inbound rows on SQLite are written through the driver (mailgw/intake/pipe.py
``sqlite_insert``): they must be the rows SQLAlchemy's own INSERT writes, value for value."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from sqlalchemy import insert, select

from mailgw.types import Envelope


def _envelopes() -> list[Envelope]:
    berlin = timezone(timedelta(hours=1))
    return [
        Envelope(raw=b"Subject: a\r\n\r\n\xff\x00 8-bit\r\n", mail_from="", source="smtp",
                 rcpt_tos=("support@example.com",), received_at=datetime(2026, 11, 27, 3, 4, 5, 6, tzinfo=UTC),
                 source_ref="127.0.0.1:4242"),
        Envelope(raw=b"Subject: b\r\n\r\nx\r\n", mail_from=None, source="pipe",
                 rcpt_tos=("jürgen@example.com", "billing@example.com"), queue="billing",
                 received_at=datetime(2026, 1, 2, 23, 59, 59, 999999, tzinfo=berlin)),
        Envelope(raw=b"", mail_from="a\u00e9@b.test", source="imap", rcpt_tos=(),
                 received_at=datetime(2026, 11, 27, 0, 0, tzinfo=UTC), source_ref="box/1/2"),
    ]


def _insert(c, row: dict) -> int:  # type: ignore[no-untyped-def]
    """SQLAlchemy's INSERT of an inbound row and its raw mail (inbound_raw, decision 35)."""
    from mailgw.store import models as m

    raw = row.pop("raw")
    inbound_id = c.execute(insert(m.Inbound).values(row).returning(m.Inbound.id)).scalar_one()
    c.execute(insert(m.InboundRaw).values(inbound_id=inbound_id, raw=raw))
    return inbound_id


def test_rows_written_by_the_driver_equal_sqlalchemys(home):
    from mailgw.intake.pipe import inbound_row
    from mailgw.queue import put_many
    from mailgw.store import models as m

    engine = home.engine()
    envs = _envelopes()
    # Given the same envelopes stored by SQLAlchemy's INSERT and by the intake's path
    with engine.begin() as c:
        reference = [_insert(c, inbound_row(e)) for e in envs]
    ours = put_many(engine, envs)
    # Then the rows read back the same (through the models and as stored)
    cols = [c for c in m.Inbound.__table__.columns if c.name != "id"] + [m.Inbound.raw]
    with engine.connect() as c:
        rows = {r.id: tuple(r[1:]) for r in c.execute(select(m.Inbound.id, *cols))}
        stored = {r[0]: tuple(r[1:]) for r in c.exec_driver_sql(
            f"SELECT id, {', '.join(col.name for col in cols[:-1])}, "
            "(SELECT raw FROM inbound_raw WHERE inbound_id = inbound.id) FROM inbound")}
    engine.dispose()
    assert len(rows) == 6 and ours != reference
    for ref, got in zip(reference, ours, strict=True):
        assert rows[ref] == rows[got]
        assert stored[ref] == stored[got]
    assert rows[ours[1]][[c.name for c in cols].index("rcpt_tos")] == [
        "jürgen@example.com", "billing@example.com"]


def test_rows_written_by_the_intake_writer_equal_sqlalchemys(home):
    # The SMTP intake's group commit writes through the driver on its own connection
    # (SQLite and PostgreSQL): the same rows as SQLAlchemy's INSERT.
    from mailgw.intake.pipe import inbound_row
    from mailgw.queue import GroupCommitWriter
    from mailgw.store import models as m

    engine = home.engine()
    envs = _envelopes()
    with engine.begin() as c:
        reference = [_insert(c, inbound_row(e)) for e in envs]
    writer = GroupCommitWriter(engine)
    try:
        futures = [writer.submit(e) for e in envs]
        ours = [f.result(30) for f in futures]
    finally:
        writer.close()
    cols = [c for c in m.Inbound.__table__.columns if c.name != "id"] + [m.Inbound.raw]
    with engine.connect() as c:
        rows = {r.id: tuple(r[1:]) for r in c.execute(select(m.Inbound.id, *cols))}
        stored = {r[0]: tuple(r[1:]) for r in c.exec_driver_sql(
            f"SELECT id, {', '.join(col.name for col in cols[:-1])}, "
            "(SELECT raw FROM inbound_raw WHERE inbound_id = inbound.id) FROM inbound")}
    engine.dispose()
    assert len(rows) == 6 and ours == sorted(ours) and not set(ours) & set(reference)
    for ref, got in zip(reference, ours, strict=True):
        assert rows[ref] == rows[got]
        assert stored[ref] == stored[got]


def test_the_intake_writer_replaces_a_connection_the_server_closed(home):
    import pytest

    if not home.store_url.startswith("postgresql"):
        pytest.skip("a server that closes connections is PostgreSQL")
    from mailgw.queue import GroupCommitWriter
    from mailgw.store import models as m

    engine = home.engine()
    writer = GroupCommitWriter(engine)
    env = _envelopes()[0]
    try:
        first = writer.submit(env).result(30)
        # When the server ends the writer's connection (a restart, an admin)
        pid = writer._raw.driver_connection.info.backend_pid
        with engine.begin() as c:
            assert c.exec_driver_sql(f"SELECT pg_terminate_backend({pid})").scalar() is True
        # Then the next messages are still stored (none refused), the first one through the
        # engine and the next on a new connection of the writer's own
        more = [writer.submit(env).result(30) for _ in range(2)]
    finally:
        writer.close()
    with engine.connect() as c:
        n = c.execute(select(m.Inbound.id)).scalars().all()
    engine.dispose()
    assert sorted(n) == [first, *more]


def _sqlite_only(home) -> None:  # type: ignore[no-untyped-def]
    import pytest

    if not home.store_url.startswith("sqlite"):
        pytest.skip("the write lock (BEGIN IMMEDIATE) is SQLite's")


def test_the_intake_writer_builds_rows_before_it_takes_the_write_lock(home, monkeypatch):
    # Given the SQLite intake writer, one message a group
    _sqlite_only(home)
    from mailgw.intake import pipe
    from mailgw.queue import GroupCommitWriter

    engine = home.engine()
    writer = GroupCommitWriter(engine)
    locked: list[bool] = []
    real = pipe.inbound_row

    def watched(env):  # type: ignore[no-untyped-def]
        raw = writer._raw
        locked.append(raw is not None and raw.driver_connection.in_transaction)
        return real(env)

    monkeypatch.setattr(pipe, "inbound_row", watched)
    try:
        # When messages are committed one after the other
        ids = [writer.submit(e).result(30) for e in _envelopes()]
    finally:
        writer.close()
        engine.dispose()
    # Then each row (its SHA-256, its Message-ID) was built with no transaction open: the
    # write lock is held for the inserts and the commit only
    assert len(ids) == 3 and locked == [False, False, False]


def test_messages_that_queue_while_the_writer_waits_for_the_lock_join_its_group(home):
    # Given the SQLite intake writer waiting for the write lock another connection holds
    _sqlite_only(home)
    import time

    from mailgw.intake.pipe import inbound_row
    from mailgw.queue import GroupCommitWriter
    from mailgw.store import models as m

    engine = home.engine()
    envs = _envelopes()
    with engine.begin() as c:
        reference = [_insert(c, inbound_row(e)) for e in envs]
    commits: list[int] = []
    writer = GroupCommitWriter(engine, linger=0, on_commit=lambda: commits.append(1))
    blocker = engine.raw_connection()
    try:
        blocker.driver_connection.execute("BEGIN IMMEDIATE")
        first = writer.submit(envs[0])
        deadline = time.monotonic() + 10
        while writer._raw is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the writer has its connection: it is in BEGIN IMMEDIATE
        time.sleep(0.1)
        # When two more messages queue meanwhile and the lock is let go
        rest = [writer.submit(e) for e in envs[1:]]
        assert not first.done()
        blocker.driver_connection.execute("ROLLBACK")
        ours = [f.result(30) for f in [first, *rest]]
    finally:
        blocker.close()
        writer.close()
    # Then the three are stored by one commit, in their order, with SQLAlchemy's rows
    cols = [c for c in m.Inbound.__table__.columns if c.name != "id"] + [m.Inbound.raw]
    with engine.connect() as c:
        rows = {r.id: tuple(r[1:]) for r in c.execute(select(m.Inbound.id, *cols))}
    engine.dispose()
    assert commits == [1] and ours == sorted(ours) and len(set(ours)) == 3
    for ref, got in zip(reference, ours, strict=True):
        assert rows[ref] == rows[got]
