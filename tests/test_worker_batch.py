"""The worker's batch store (issue 8 follow-up): no savepoint on the happy path, one
redelivery query per batch. Both stores; what a batch commits must not depend on the path."""

from __future__ import annotations

import threading

import pytest

from mailgw import worker as worker_mod
from mailgw.process import Context
from mailgw.worker import Worker
from tests.helpers import Harness, mail


@pytest.fixture
def hx(home):  # type: ignore[no-untyped-def]
    h = Harness(home)
    yield h
    h.close()


def _events(hx: Harness, type_: str, inbound_id: int) -> list:
    return [e for e in hx.events(type_) if e.inbound_id == inbound_id]


def test_two_copies_in_one_batch_make_one_article(hx):
    raw = mail("Twice in one batch", msgid="twice@c")
    first, second = hx.put(raw, raw)
    assert hx.worker.run_batch() == 2  # both in the same batch
    assert (hx.inbound(first).state, hx.inbound(second).state) == ("done", "done")
    assert len([a for a in hx.articles() if a.direction == "in"]) == 1
    [dup] = hx.events("duplicate_ignored")
    assert dup.inbound_id == second and dup.data["same_as_inbound"] == first
    # A copy for another queue in the same batch is its own delivery
    [third] = hx.put(raw, rcpt="billing@example.com")
    hx.drain()
    assert hx.inbound(third).ticket_id is not None
    assert len(hx.events("duplicate_ignored")) == 1


def test_one_failing_message_quarantines_alone_and_the_rest_is_stored_once(hx):
    raw = mail("Good", msgid="good@c")
    ids = hx.put(raw, mail("Lost", msgid="lost@c"), raw,
                 mail("Other", msgid="other@c", sender="bob@customer.test"))
    # The second one goes to a recipient no queue serves: an application error
    from sqlalchemy import update

    from mailgw.store import models as m

    with hx.engine.begin() as c:
        c.execute(update(m.Inbound).where(m.Inbound.id == ids[1])
                  .values(rcpt_tos=["nobody@elsewhere.test"]))
    assert hx.worker.run_batch() == 4
    assert [hx.inbound(i).state for i in ids] == ["done", "quarantined", "done", "done"]
    assert "no configured queue" in hx.inbound(ids[1]).error
    # Nothing of the first, rolled-back attempt is left: each event once, one ack each
    assert len(hx.tickets()) == 2
    for iid in (ids[0], ids[3]):
        assert len(_events(hx, "ticket_created", iid)) == 1
        assert len(_events(hx, "article_received", iid)) == 1
        assert len(_events(hx, "auto_response_queued", iid)) == 1
    assert len(_events(hx, "quarantined", ids[1])) == 1
    assert _events(hx, "article_received", ids[1]) == []
    # The copy after the failing message is still recognised in the savepoint pass
    [dup] = hx.events("duplicate_ignored")
    assert dup.inbound_id == ids[2] and dup.data["same_as_inbound"] == ids[0]
    assert len(hx.outbox()) == 2


def test_bounce_read_from_the_bytes_read_for_parsing(hx):
    # Classification reads a bounce's report from the raw bytes the parse step read (not a
    # second load): the bounce must still attach to our article and fail its delivery.
    hx.put(mail("Printer", msgid="p@c"))
    hx.drain()
    [ack] = hx.outbox()
    bounce = (
        "From: MAILER-DAEMON@mx.customer.test\r\nTo: support@example.com\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nThe mail could not be delivered.\r\n"
        "--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.customer.test\r\n\r\n"
        "Final-Recipient: rfc822; alice@customer.test\r\nAction: failed\r\n"
        "Status: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1 no such user\r\n"
        "--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Message-ID: <{ack.message_id.strip('<>')}>\r\nSubject: ack\r\n"
        "--b--\r\n").encode()
    [iid] = hx.put(bounce, mail_from="")
    hx.drain()
    row = hx.inbound(iid)
    assert row.state == "done" and row.article_id is not None
    out = [a for a in hx.articles() if a.direction == "out"][0]
    assert out.delivery_state == "failed" and "5.1.1" in out.delivery_error


@pytest.mark.timeout(60)
def test_two_workers_holding_two_copies_in_their_batches_store_it_once(hx, monkeypatch):
    # The batch takes the redelivery locks up front: on PostgreSQL a worker whose batch holds
    # the retry of a message another worker is storing waits for that commit, then sees it.
    if hx.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer: two transactions cannot overlap")
    raw = mail("Once only", msgid="race@c")
    first, second = hx.put(raw, raw)
    ctx = Context(hx.settings, hx.renderer)
    a = Worker(hx.engine, lambda: ctx, batch_size=1, max_attempts=3)
    b = Worker(hx.engine, lambda: ctx, batch_size=1, max_attempts=3)
    b.me = a.me + "-b"
    stored, go_on = threading.Event(), threading.Event()
    real = worker_mod.process

    def process(session, row, *args, **kw):  # type: ignore[no-untyped-def]
        real(session, row, *args, **kw)
        if threading.current_thread().name == "A":
            stored.set()
            go_on.wait(20)  # A holds its transaction open, its copy stored

    monkeypatch.setattr(worker_mod, "process", process)
    ta = threading.Thread(target=a.run_batch, name="A")
    ta.start()
    assert stored.wait(20)
    b_done = threading.Event()
    tb = threading.Thread(target=lambda: (b.run_batch(), b_done.set()), name="B")
    tb.start()
    assert not b_done.wait(1.0)  # B waits for A's commit instead of storing a second copy
    go_on.set()
    ta.join(20)
    tb.join(20)
    assert b_done.is_set()
    assert (hx.inbound(first).state, hx.inbound(second).state) == ("done", "done")
    assert len([x for x in hx.articles() if x.direction == "in"]) == 1
    [dup] = hx.events("duplicate_ignored")
    assert dup.inbound_id == second and dup.data["same_as_inbound"] == first


def test_a_deadlock_stores_the_batch_again_whole(hx):
    # PostgreSQL: two workers updating the same two tickets in opposite orders deadlock; the
    # loser's batch is no message's fault and is stored again at once, not one by one.
    if hx.engine.dialect.name != "postgresql":
        pytest.skip("a deadlock is PostgreSQL's (SQLite has one writer)")
    with hx.engine.begin() as c:
        # The first article insert fails as a deadlock would; a sequence is not rolled back.
        c.exec_driver_sql("CREATE SEQUENCE deadlock_once")
        c.exec_driver_sql(
            "CREATE FUNCTION deadlock_once() RETURNS trigger AS $$ BEGIN "
            "IF nextval('deadlock_once') = 1 THEN RAISE EXCEPTION 'test deadlock' "
            "USING ERRCODE = '40P01'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql")
        c.exec_driver_sql("CREATE TRIGGER deadlock_once BEFORE INSERT ON articles "
                          "FOR EACH ROW EXECUTE FUNCTION deadlock_once()")
    ids = hx.put(mail("one", msgid="d1@c"), mail("two", msgid="d2@c", sender="bob@customer.test"),
                 mail("three", msgid="d3@c", sender="carol@customer.test"))
    assert hx.worker.run_batch() == 3  # one batch, stored on its second try
    assert [hx.inbound(i).state for i in ids] == ["done", "done", "done"]
    assert [hx.inbound(i).attempts for i in ids] == [1, 1, 1]  # not retried one by one
    assert len([a for a in hx.articles() if a.direction == "in"]) == 3
    for iid in ids:
        assert len(_events(hx, "article_received", iid)) == 1
    assert len(hx.outbox()) == 3


def test_a_database_error_that_is_not_transient_is_not_stored_again(hx, monkeypatch):
    # Any other database error still rolls the batch back and releases it at once.
    calls = []
    store = Worker._store

    def failing_store(self, *args, **kw):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            from sqlalchemy.exc import OperationalError

            raise OperationalError("INSERT", {}, Exception("disk I/O error"))
        return store(self, *args, **kw)

    monkeypatch.setattr(Worker, "_store", failing_store)
    ids = hx.put(mail("x", msgid="x1@c"), mail("y", msgid="y1@c", sender="bob@customer.test"))
    assert hx.worker.run_batch() == 0
    assert len(calls) == 1
    assert [hx.inbound(i).claimed_by for i in ids] == [None, None]  # released at once
    hx.drain()
    assert [hx.inbound(i).state for i in ids] == ["done", "done"]
