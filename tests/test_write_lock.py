"""Fewer turns of the write lock per message (issue 8, session 5; decision 26).

- the worker claims its next batch in the transaction that stores the current one;
- a worker or sender that finds nothing to claim (SQLite) takes no write lock for it;
- the intake writer puts what queued while it waited for the lock into the same commit;
- the sender leases its next batch in the transaction that records the last one.
"""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import Future
from datetime import timedelta

import pytest
from sqlalchemy import event, update

from mailgw.outbound.sender import Sender
from mailgw.process import Context
from mailgw.queue import GroupCommitWriter, now
from mailgw.settings import Relay
from mailgw.settings import Sender as SenderCfg
from mailgw.store import models as m
from mailgw.worker import Worker
from tests.helpers import Harness, envelope, mail


@pytest.fixture
def hx(home):  # type: ignore[no-untyped-def]
    h = Harness(home)
    yield h
    h.close()


def _worker(hx: Harness, batch_size: int) -> Worker:
    return Worker(hx.engine, lambda: Context(hx.settings, hx.renderer), batch_size=batch_size,
                  max_attempts=3)


def _senders(n: int) -> list[bytes]:
    return [mail(f"Question {i}", msgid=f"q{i}@c", sender=f"c{i}@customer.test")
            for i in range(n)]


def _write_transactions(engine):  # type: ignore[no-untyped-def]
    """Count the transactions that take the write lock (SQLite: not DEFERRED)."""
    seen: list[str] = []

    @event.listens_for(engine, "begin")
    def begin(conn):  # type: ignore[no-untyped-def]
        seen.append(conn.get_execution_options().get("sqlite_begin", "IMMEDIATE"))

    return lambda: [mode for mode in seen if mode != "DEFERRED"]


def test_a_full_next_batch_is_claimed_in_the_store_transaction(hx):
    w = _worker(hx, batch_size=2)
    ids = hx.put(*_senders(5))
    # When the worker stores a batch of two while a full batch (two more) waits
    assert w.run_batch() == 2
    # Then those are leased to it already, their attempt counted, by that same transaction
    for iid in ids[2:4]:
        row = hx.inbound(iid)
        assert (row.state, row.claimed_by, row.attempts) == ("pending", w.me, 1)
    # And the next pass processes them without another claim (their attempt counted once)
    writes = _write_transactions(hx.engine)
    assert w.run_batch() == 2
    taken = writes()
    assert [(hx.inbound(i).state, hx.inbound(i).attempts) for i in ids[2:4]] == [("done", 1)] * 2
    if hx.engine.dialect.name == "sqlite":
        assert len(taken) == 1  # the store; no claim of its own
    # A part of a batch is left for a claim of its own (which takes what arrives meanwhile)
    assert hx.inbound(ids[4]).claimed_by is None
    assert w.run_batch() == 1
    assert w.run_batch() == 0


def test_the_next_claim_rolls_back_with_a_failed_store(hx, monkeypatch):
    w = _worker(hx, batch_size=2)
    ids = hx.put(*_senders(4))
    real = Worker._claim_in

    def claim_then_fail(self, s, stamp, *, first):  # type: ignore[no-untyped-def]
        out = real(self, s, stamp, first=first)
        if not first:
            from sqlalchemy.exc import OperationalError

            raise OperationalError("COMMIT", {}, Exception("disk I/O error"))
        return out

    monkeypatch.setattr(Worker, "_claim_in", claim_then_fail)
    # When the store transaction fails after claiming the next batch
    assert w.run_batch() == 0
    # Then nothing of it stayed: the batch is released, the third message was never claimed
    assert [hx.inbound(i).state for i in ids] == ["pending"] * 4
    assert [hx.inbound(i).claimed_by for i in ids] == [None] * 4
    assert [hx.inbound(i).attempts for i in ids[2:]] == [0, 0]
    assert w._next == []


def test_a_retried_row_is_not_claimed_with_the_next_batch(hx):
    # A row whose attempts are counted (its worker crashed) is processed alone by a claim of
    # its own (quarantined past max_attempts), never taken along at the end of a store.
    w = _worker(hx, batch_size=2)
    ids = hx.put(*_senders(4))
    with hx.engine.begin() as c:
        c.execute(update(m.Inbound).where(m.Inbound.id == ids[2]).values(attempts=1))
    assert w.run_batch() == 2
    assert hx.inbound(ids[2]).claimed_by is None
    assert w.run_batch() == 1
    assert (hx.inbound(ids[2]).state, hx.inbound(ids[2]).attempts) == ("done", 2)


def test_a_stopping_worker_gives_back_its_next_batch(hx):
    w = _worker(hx, batch_size=2)
    ids = hx.put(*_senders(4))
    stop, wake = threading.Event(), threading.Event()
    real = w.run_batch

    def once():  # type: ignore[no-untyped-def]
        n = real()
        stop.set()  # asked to stop while the third message is leased to it
        return n

    w.run_batch = once  # type: ignore[method-assign]
    w.run(stop, wake, poll_interval=0.01)
    for iid in ids[2:]:
        row = hx.inbound(iid)
        assert (row.state, row.claimed_by, row.claimed_until) == ("pending", None, None)
    hx.drain()
    assert [hx.inbound(i).state for i in ids] == ["done"] * 4


def test_a_worker_with_nothing_to_claim_takes_no_write_lock(hx):
    if hx.engine.dialect.name != "sqlite":
        pytest.skip("the one write lock is SQLite's")
    w = _worker(hx, batch_size=8)
    hx.put(*_senders(1))
    assert w.run_batch() == 1
    writes = _write_transactions(hx.engine)
    assert w.run_batch() == 0
    assert writes() == []


def _hold_write_lock(hx: Harness) -> sqlite3.Connection:
    db = hx.engine.url.database
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    return lock


def test_intake_commits_what_queued_while_it_waited_for_the_lock(hx):
    if hx.engine.dialect.name != "sqlite":
        pytest.skip("the one write lock is SQLite's")
    commits: list[int] = []
    checked_out = threading.Event()
    event.listen(hx.engine, "checkout", lambda *a: checked_out.set())
    lock = _hold_write_lock(hx)  # another writer holds the lock
    writer = GroupCommitWriter(hx.engine, on_commit=lambda: commits.append(1))
    try:
        # When one message is submitted, the writer goes for the lock and waits
        first = writer.submit(envelope(mail("first", msgid="f@c")))
        assert checked_out.wait(30)
        # and three more arrive while it waits
        more = [writer.submit(envelope(raw)) for raw in _senders(3)]
        lock.rollback()
        ids = [first.result(30)] + [f.result(30) for f in more]
    finally:
        lock.close()
        writer.close()
    # Then all four went into the one commit the writer was waiting to make
    assert len(commits) == 1
    assert [hx.inbound(i).state for i in ids] == ["pending"] * 4


def test_intake_keeps_a_large_message_for_a_commit_of_its_own(hx):
    # A large message (RawBuffer) that queued while the writer waited is not taken into the
    # group (its buffer can be written once only): it follows in the next commit.
    if hx.engine.dialect.name != "sqlite":
        pytest.skip("the one write lock is SQLite's")
    from mailgw.intake.pipe import RawBuffer

    big = mail("big", msgid="big@c") + b"x" * 2_000_000 + b"\r\n"
    commits: list[int] = []
    checked_out = threading.Event()
    event.listen(hx.engine, "checkout", lambda *a: checked_out.set())
    lock = _hold_write_lock(hx)
    writer = GroupCommitWriter(hx.engine, on_commit=lambda: commits.append(1))
    try:
        first = writer.submit(envelope(mail("first", msgid="f@c")))
        assert checked_out.wait(30)
        futs: list[Future[int]] = [writer.submit(envelope(RawBuffer(big))),
                                   writer.submit(envelope(mail("after", msgid="a@c")))]
        lock.rollback()
        ids = [first.result(30)] + [f.result(30) for f in futs]
    finally:
        lock.close()
        writer.close()
    assert len(commits) == 2  # the first alone (the large one ended the taking), then the rest
    assert hx.inbound(ids[1]).raw == big
    assert ids == sorted(ids)


def _sender(hx: Harness, port: int, batch_size: int) -> Sender:
    return Sender(hx.engine, Relay(host="127.0.0.1", port=port, timeout=5),
                  hx.home.path / "store" / "outbox", SenderCfg(), batch_size=batch_size)


def test_the_sender_leases_a_full_next_batch_when_it_records_the_last(hx, sink):
    hx.put(*_senders(5))
    hx.drain()
    rows = hx.outbox()
    assert len(rows) == 5
    sender = _sender(hx, sink.port, batch_size=2)
    # When a pass sends two of five due mails
    assert sender.run_once() == 2
    # Then the next two are leased by the transaction that recorded the two as sent
    rows = hx.outbox()
    assert [r.lease_until is not None for r in rows[2:]] == [True, True, False]
    assert sender._next == [rows[2].id, rows[3].id]
    # And the next pass sends them without a claim of its own; the fifth (not a full
    # batch) is left to a claim of its own on SQLite, leased with the record on PostgreSQL
    writes = _write_transactions(hx.engine)
    assert sender.run_once() == 2
    taken = writes()
    if hx.engine.dialect.name == "sqlite":
        assert len(taken) == 1  # the record (its claim found less than a batch)
        assert sender._next == []
    else:
        assert sender._next == [rows[4].id]
    assert sender.run_once() == 1
    assert [r.state for r in hx.outbox()] == ["sent"] * 5
    assert len(sink.messages) == 5
    assert sender.run_once() == 0


def test_a_stopping_sender_gives_back_its_next_batch(hx, sink):
    hx.put(*_senders(4))
    hx.drain()
    sender = _sender(hx, sink.port, batch_size=2)
    stop, wake = threading.Event(), threading.Event()
    real = sender.run_once

    def once(stop_=None):  # type: ignore[no-untyped-def]
        n = real(stop_)
        stop.set()
        return n

    sender.run_once = once  # type: ignore[method-assign]
    sender.run(stop, wake)
    assert [(r.state, r.lease_until) for r in hx.outbox()[2:]] == [("pending", None)] * 2


def test_a_failed_mail_is_not_leased_again_with_the_next_batch(hx, sink):
    # The backoff written in the record transaction is seen by the claim in it.
    hx.put(*_senders(4))
    hx.drain()
    sink.refusals = ["451 4.3.0 try later"]
    sender = _sender(hx, sink.port, batch_size=2)
    assert sender.run_once() == 2
    first = hx.outbox()[0]
    assert first.state == "pending" and first.next_attempt_at.replace(tzinfo=None) > \
        (now() + timedelta(seconds=1)).replace(tzinfo=None)
    assert sender._next == [r.id for r in hx.outbox()[2:]]  # a full batch, not the failed one


def test_intake_lingers_for_sessions_still_receiving_data(hx):
    # With a session in DATA, the writer waits (up to ``linger``) for its message to share
    # the commit instead of committing the first one alone.
    commits: list[int] = []
    writer = GroupCommitWriter(hx.engine, on_commit=lambda: commits.append(1), linger=30)
    lingering = threading.Event()
    real_get = writer._q.get

    def get(block=True, timeout=None):  # type: ignore[no-untyped-def]
        if timeout is not None:
            lingering.set()
        return real_get(block, timeout)

    writer._q.get = get  # type: ignore[method-assign]
    try:
        writer.receiving = 1  # as mailgw/intake/smtp.py counts a session between 354 and "."
        first = writer.submit(envelope(mail("first", msgid="f@c")))
        assert lingering.wait(30)
        writer.receiving = 0
        second = writer.submit(envelope(mail("second", msgid="s@c")))
        ids = [first.result(30), second.result(30)]
    finally:
        writer.close()
    assert len(commits) == 1
    assert [hx.inbound(i).state for i in ids] == ["pending", "pending"]


def test_smtp_counts_sessions_receiving_data(hx):
    # The counter the writer lingers on goes up at 354 and down once the message is read,
    # before it is handed to the writer.
    import smtplib

    from aiosmtpd.controller import Controller

    from mailgw.intake.smtp import IntakeHandler, protocol_factory
    from tests.conftest import free_port

    class Counting(GroupCommitWriter):
        def __setattr__(self, key, value):  # type: ignore[no-untyped-def]
            if key == "receiving":
                self.__dict__.setdefault("values", []).append(value)
            super().__setattr__(key, value)

    writer = Counting(hx.engine)
    handler = IntakeHandler(hx.settings, writer, source="smtp")
    port = free_port()

    class _Controller(Controller):
        def factory(self):  # type: ignore[no-untyped-def]
            return protocol_factory(hx.settings.smtp, handler, "helpdesk.test", False)()

    ctl = _Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.sendmail("x@customer.test", ["support@example.com"], mail("one", msgid="o@c"))
    finally:
        ctl.stop()
        writer.close()
    assert writer.values == [0, 1, 0]  # type: ignore[attr-defined]
    assert hx.pending() == 1
