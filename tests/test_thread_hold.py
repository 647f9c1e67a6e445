"""Every reply threaded, also under concurrency (docs/architecture.md decision 31).

A reply whose original is still in the queue (claimed by another worker that has not
committed it, not claimed yet, or received after the reply) is held back, unprocessed and
without an attempt counted, and stored once the original is: it threads into the original's
ticket instead of opening one. Bounded: a reply is held at most ``HOLD_MAX``; an original
that is quarantined holds nobody. Both stores, real workers (Worker objects), no mocks.
"""

from __future__ import annotations

import smtplib
import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from mailgw import threader
from mailgw import worker as worker_mod
from mailgw.intake.pipe import RawBuffer, message_id_of
from mailgw.process import Context
from mailgw.queue import GroupCommitWriter, now
from mailgw.store import models as m
from mailgw.worker import Worker
from tests.conftest import wait_until
from tests.helpers import Harness, envelope, mail


@pytest.fixture
def hx(home):  # type: ignore[no-untyped-def]
    h = Harness(home)
    yield h
    h.close()


def _worker(hx: Harness, name: str, batch_size: int = 1) -> Worker:
    ctx = Context(hx.settings, hx.renderer)
    w = Worker(hx.engine, lambda: ctx, batch_size=batch_size, max_attempts=3, linger=0)
    w.me = f"{w.me}-{name}"
    return w


def _original() -> bytes:
    return mail("Printer on fire", msgid="orig@customer.test")


def _reply(msgid: str = "reply@customer.test", parent: str = "orig@customer.test") -> bytes:
    return mail("Re: Printer on fire", msgid=msgid, In_Reply_To=f"<{parent}>",
                References=f"<{parent}>")


def _store(w: Worker, ids: list[int]) -> None:
    """Store a batch ``w`` claimed earlier (``w._claim()``)."""
    w._next = ids
    assert w.run_batch() == len(ids)


def _finish(hx: Harness, *workers: Worker) -> None:
    """Run the workers until the queue is empty; a held row is claimable again after its
    short delay (``HOLD_DELAY``), by whichever worker looks first (the one that stored the
    original may have claimed it as its next batch)."""
    deadline = time.monotonic() + 5
    while hx.pending():
        assert time.monotonic() < deadline, "the held rows were not stored"
        if not sum(w.run_batch() for w in workers):
            time.sleep(0.01)


def _ticket_of(hx: Harness, iid: int) -> int | None:
    return hx.inbound(iid).ticket_id


def test_a_reply_stored_while_another_worker_holds_its_original_threads_into_it(hx):
    # Given an original claimed by worker A (not stored yet) and its reply
    parent, reply = hx.put(_original(), _reply())
    a, b = _worker(hx, "a"), _worker(hx, "b")
    assert a._claim() == [parent]
    # When worker B takes the reply, it is held back: unprocessed, no attempt counted
    assert b.run_batch() == 1
    row = hx.inbound(reply)
    assert (row.state, row.attempts, row.claimed_by, row.ticket_id) == ("pending", 0, None, None)
    assert row.held_since is not None and row.claimed_until is not None
    assert hx.tickets() == [] and b.run_batch() == 0  # not claimable during its delay
    # And once A has stored the original, the reply is stored on the original's ticket
    _store(a, [parent])
    _finish(hx, b, a)
    [ticket] = hx.tickets()
    assert _ticket_of(hx, parent) == _ticket_of(hx, reply) == ticket.id
    row = hx.inbound(reply)
    assert (row.state, row.attempts) == ("done", 1)
    [received] = [e for e in hx.events("article_received") if e.inbound_id == reply]
    assert received.data["threaded_by"] == "in_reply_to"


@pytest.mark.timeout(60)
def test_a_reply_stored_while_another_workers_transaction_stores_its_original(hx, monkeypatch):
    # PostgreSQL runs two batches side by side: B stores the reply while A's transaction has
    # stored the original and not committed yet. B must not open a ticket of its own.
    if hx.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer: two transactions cannot overlap")
    parent, reply = hx.put(_original(), _reply())
    a, b = _worker(hx, "a"), _worker(hx, "b")
    stored, go_on = threading.Event(), threading.Event()
    real = worker_mod.process

    def process(session, row, *args, **kw):  # type: ignore[no-untyped-def]
        real(session, row, *args, **kw)
        if threading.current_thread().name == "A":
            stored.set()
            go_on.wait(20)  # A's transaction stays open, the original stored in it

    monkeypatch.setattr(worker_mod, "process", process)
    ta = threading.Thread(target=a.run_batch, name="A")
    ta.start()
    assert stored.wait(20)
    assert b.run_batch() == 1  # B does not wait for A: it holds the reply back
    assert hx.inbound(reply).state == "pending"
    go_on.set()
    ta.join(20)
    _finish(hx, b, a)
    assert len(hx.tickets()) == 1
    assert _ticket_of(hx, parent) == _ticket_of(hx, reply)


def test_a_reply_received_before_its_original_in_one_batch_threads_into_it(hx):
    # The reply's row is older than its original's (8 SMTP sessions: it was committed first);
    # both in one batch, the original is stored first.
    reply, parent = hx.put(_reply(), _original())
    assert hx.worker.run_batch() == 2
    [ticket] = hx.tickets()
    assert _ticket_of(hx, reply) == _ticket_of(hx, parent) == ticket.id
    assert ticket.title == "Printer on fire"
    # The article ids follow the order stored: the original's first
    articles = hx.articles(ticket.id)
    assert [a.inbound_id for a in articles if a.direction == "in"] == [parent, reply]


def test_a_reply_received_before_its_original_waits_for_it_in_the_queue(hx):
    # The reply is claimed alone; its original, received later, is pending and unclaimed.
    reply, parent = hx.put(_reply(), _original())
    w = _worker(hx, "w")
    assert w.run_batch() == 1  # the reply, held back
    assert hx.inbound(reply).state == "pending" and hx.tickets() == []
    assert w.run_batch() == 1  # the original
    _finish(hx, w)
    assert len(hx.tickets()) == 1 and _ticket_of(hx, reply) == _ticket_of(hx, parent)


def test_a_reply_to_a_reply_held_in_the_same_batch_is_held_too(hx):
    # The original is claimed by A; B's batch has the reply and a reply to the reply: both
    # wait (the second would otherwise thread into a ticket the first has not got yet).
    parent, r1, r2 = hx.put(_original(), _reply("r1@customer.test"),
                            _reply("r2@customer.test", parent="r1@customer.test"))
    a, b = _worker(hx, "a"), _worker(hx, "b", batch_size=8)
    assert a._claim() == [parent]
    assert b.run_batch() == 2
    assert [hx.inbound(i).state for i in (r1, r2)] == ["pending", "pending"]
    _store(a, [parent])
    _finish(hx, b, a)
    assert len(hx.tickets()) == 1
    assert _ticket_of(hx, r1) == _ticket_of(hx, r2) == _ticket_of(hx, parent)


def test_a_reply_is_held_at_most_hold_max_then_opens_its_ticket_and_says_why(hx):
    # An original that stays claimed (its worker hung) holds its reply only so long.
    parent, reply = hx.put(_original(), _reply())
    a, b = _worker(hx, "a"), _worker(hx, "b")
    assert a._claim() == [parent]
    assert b.run_batch() == 1
    assert hx.inbound(reply).state == "pending"
    # When the reply was first held longer ago than HOLD_MAX
    since = now() - threader.HOLD_MAX - timedelta(seconds=1)
    with hx.engine.begin() as c:
        c.execute(update(m.Inbound).where(m.Inbound.id == reply)
                  .values(held_since=since, claimed_until=None))
    # Then it is processed as it is: a ticket of its own, the reason stored
    assert b.run_batch() == 1
    row = hx.inbound(reply)
    assert row.state == "done" and row.ticket_id is not None
    [received] = [e for e in hx.events("article_received") if e.inbound_id == reply]
    assert received.data["threaded_by"] == "new_ticket"
    assert f"inbound {parent} with the message it refers to was still in the queue after" \
        in received.data["reason"]


def test_an_original_that_is_quarantined_holds_its_reply_no_longer(hx):
    # The original goes to a queue that is not configured: quarantined when stored.
    [parent] = hx.put(_original(), queue="no-such-queue")
    [reply] = hx.put(_reply())
    a, b = _worker(hx, "a"), _worker(hx, "b")
    assert a._claim() == [parent]
    assert b.run_batch() == 1 and hx.inbound(reply).state == "pending"
    _store(a, [parent])
    assert hx.inbound(parent).state == "quarantined"
    _finish(hx, b, a)  # at once, not after HOLD_MAX
    row = hx.inbound(reply)
    assert row.state == "done" and row.attempts == 1
    assert len(hx.tickets()) == 1


def test_two_messages_that_refer_to_each_other_do_not_wait_for_each_other(hx):
    # Each refers to the other and each is claimed by another worker: both are held once,
    # then claimed together into one batch and stored there, one ticket, no deadlock.
    x, y = hx.put(_reply("x@customer.test", parent="y@customer.test"),
                  _reply("y@customer.test", parent="x@customer.test"))
    a, b = _worker(hx, "a", batch_size=8), _worker(hx, "b", batch_size=8)
    ids_a = a._claim()
    ids_b = b._claim()
    assert ids_a == [x, y] and ids_b == []  # one claim takes both ...
    _store(a, ids_a)
    assert len(hx.tickets()) == 1  # ... and one of them opens the ticket the other joins
    assert _ticket_of(hx, x) == _ticket_of(hx, y)


def test_two_messages_that_refer_to_each_other_in_two_workers_are_stored_soon(hx):
    x, y = hx.put(_reply("x@customer.test", parent="y@customer.test"),
                  _reply("y@customer.test", parent="x@customer.test"))
    a, b = _worker(hx, "a"), _worker(hx, "b", batch_size=8)
    assert a._claim() == [x]
    assert b._claim() == [y]
    _store(a, [x])
    _store(b, [y])
    assert [hx.inbound(i).state for i in (x, y)] == ["pending", "pending"]  # both held
    time.sleep(threader.HOLD_DELAY.total_seconds() + 0.05)
    assert b.run_batch() == 2  # claimable again together: one batch
    assert len(hx.tickets()) == 1 and _ticket_of(hx, x) == _ticket_of(hx, y)
    assert [hx.inbound(i).attempts for i in (x, y)] == [1, 1]


def test_a_reply_to_a_message_that_is_done_without_a_ticket_is_not_held(hx):
    # The original was processed but made no article (a redelivery of it is ignored, here:
    # the filter dropped it would be the same): nothing in the queue, no hold.
    [parent] = hx.put(_original())
    hx.drain()
    with hx.engine.begin() as c:  # as if its article had never been made
        c.execute(update(m.Inbound).where(m.Inbound.id == parent).values(ticket_id=None))
        c.exec_driver_sql("DELETE FROM articles WHERE message_id = 'orig@customer.test'")
    [reply] = hx.put(_reply())
    assert hx.worker.run_batch() == 1
    assert hx.inbound(reply).state == "done"


def _harness(home, wait: float) -> Harness:  # type: ignore[no-untyped-def]
    home.update_config(worker={"orphan_reply_wait": wait})
    return Harness(home)


def test_a_reply_received_before_its_original_was_stored_at_all_waits_for_it(home):
    # 8 SMTP sessions: the reply was committed, its original not yet (no row at all).
    h = _harness(home, 0.5)
    try:
        [reply] = h.put(_reply())
        assert h.worker.run_batch() == 1
        row = h.inbound(reply)
        assert (row.state, row.attempts) == ("pending", 0) and row.held_since is not None
        [parent] = h.put(_original())
        h.drain()  # the original at once, the reply once its wait is over
        [ticket] = h.tickets()
        assert h.inbound(reply).ticket_id == h.inbound(parent).ticket_id == ticket.id
        assert ticket.title == "Printer on fire"
    finally:
        h.close()


def test_a_reply_whose_original_arrives_a_moment_later_does_not_wait_out_the_orphan_wait(home):
    # Seen in the end-of-day benchmark: a reply received before its original was held
    # once for the whole orphan wait (2 s) although its original came milliseconds later,
    # so the run ended 2 s late. It is looked at again after as long as it has waited.
    h = _harness(home, 30)
    try:
        [reply] = h.put(_reply())
        assert h.worker.run_batch() == 1  # held: no original anywhere yet
        [parent] = h.put(_original())
        started = time.monotonic()
        h.drain()
        assert time.monotonic() - started < 10  # not the 30 s of the wait
        [ticket] = h.tickets()
        assert h.inbound(reply).ticket_id == h.inbound(parent).ticket_id == ticket.id
    finally:
        h.close()


def test_a_reply_to_a_message_never_received_opens_its_ticket_after_the_wait(home):
    h = _harness(home, 0.3)
    try:
        [reply] = h.put(_reply())
        started = time.monotonic()
        h.drain()
        assert time.monotonic() - started >= 0.2  # held until its wait is over
        row = h.inbound(reply)
        assert (row.state, row.attempts) == ("done", 1) and row.ticket_id is not None
        [received] = [e for e in h.events("article_received") if e.inbound_id == reply]
        assert received.data["threaded_by"] == "new_ticket"
    finally:
        h.close()


def test_without_the_orphan_wait_such_a_reply_opens_its_ticket_at_once(home):
    h = _harness(home, 0)
    try:
        [reply] = h.put(_reply())
        assert h.worker.run_batch() == 1
        assert h.inbound(reply).state == "done" and h.inbound(reply).held_since is None
    finally:
        h.close()


# --- Intake: message_id ------------------------------------------------------------------


def test_message_id_of_is_what_the_parser_says():
    from bench.gen_corpus import generate
    from mailgw.mail.parse import parse_message
    from tests.corpus import iter_corpus_messages

    # Two corpus messages have a line that is not a header field inside their header block:
    # the parser ends the header block there, message_id_of reads on to the empty line.
    known = {"ruby-mail-gem/spec/fixtures/emails/plain_emails/raw_email_incorrect_header.eml",
             "ruby-mail-gem/spec/fixtures/emails/rfc2822/example13.eml"}
    samples = list(iter_corpus_messages()) + generate(300)
    samples += [
        ("folded", b"Subject: x\r\nMessage-ID:\r\n <folded@c>\r\n\r\nbody\r\n"),
        ("spaces", b"message-id:  < a b@c >\r\n\r\n"),
        ("space before the colon", b"Message-ID : <sp@c>\r\n\r\n"),
        ("no brackets", b"Message-Id: bare@c\r\n\r\n"),
        ("no id", b"Message-ID: \r\nSubject: x\r\n\r\n"),
        ("lf only", b"From: a@b\nMessage-ID: <lf@c>\n\nMessage-ID: <body@c>\n"),
        ("in body only", b"From: a@b\r\n\r\nMessage-ID: <body@c>\r\n"),
        ("second wins not", b"Message-ID: <one@c>\r\nMessage-ID: <two@c>\r\n\r\n"),
        ("resent", b"Resent-Message-ID: <r@c>\r\nX-Message-ID: <x@c>\r\n\r\n"),
        ("8-bit", "Message-ID: <jürgen@c>\r\n\r\n".encode()),
        ("NUL", b"Message-ID: <a\x00b@c>\r\n\r\n"),
    ]
    checked = 0
    for name, raw in samples:
        try:
            want = parse_message(raw).message_id
        except Exception:  # noqa: BLE001, S112 - not a message: nothing to compare
            continue
        if want is not None and ("\x00" in want or len(want) > 998):
            want = None  # never referred to (mailgw.threader.message_refs)
        got = message_id_of(raw)
        assert got == want or (name in known and want is None), (name, want, got)
        assert message_id_of(RawBuffer(raw)) == got
        checked += 1
    assert checked > 3000


def test_intake_writer_and_sqlalchemy_fill_message_id(hx):
    # The SMTP/LMTP intake's group commit (small and large messages) and put_many (IMAP's
    # put_in, the fallback paths) store the Message-ID.
    big = RawBuffer(mail("big", msgid="big@c", body="x" * (2 << 20)))
    writer = GroupCommitWriter(hx.engine)
    try:
        futures = [writer.submit(envelope(mail("one", msgid="one@c"))),
                   writer.submit(envelope(big)),
                   writer.submit(envelope(b"Subject: none\r\n\r\nx\r\n"))]
        ids = [f.result(30) for f in futures]
    finally:
        writer.close()
    ids += hx.put(mail("two", msgid="two@c"))
    assert [hx.inbound(i).message_id for i in ids] == ["one@c", "big@c", None, "two@c"]


def test_smtp_intake_and_deliver_store_the_message_id(home, gateway):
    gateway.start("--role", "smtp")
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as s:
        s.sendmail("a@customer.test", ["support@example.com"], mail("smtp", msgid="smtp@c"))
    proc = home.cli("deliver", "--sender", "a@customer.test", "--recipient",
                    "support@example.com", input=mail("pipe", msgid="pipe@c"))
    assert proc.returncode == 0, proc.stderr
    engine = home.engine()
    try:
        def rows():  # type: ignore[no-untyped-def]
            with engine.connect() as c:
                return dict(c.execute(select(m.Inbound.source, m.Inbound.message_id)).all())
        wait_until(lambda: len(rows()) == 2, timeout=20, what="both stored")
        assert rows() == {"smtp": "smtp@c", "pipe": "pipe@c"}
    finally:
        engine.dispose()


# --- Migration 0017 ------------------------------------------------------------------------


def test_migration_0017_fills_the_pending_rows_and_goes_down_and_up_again(store_url):
    import sqlalchemy as sa
    from alembic import command

    from mailgw.store.db import _alembic_config, current_revision, make_engine

    engine = make_engine(store_url)
    cfg = _alembic_config(engine)
    command.upgrade(cfg, "0016")
    inbound = sa.table("inbound", *(sa.column(c) for c in (
        "received_at", "source", "size", "sha256", "state", "attempts")),
        sa.column("raw", sa.LargeBinary), sa.column("rcpt_tos", sa.JSON))
    raws = [_reply(), _original(), b"Subject: no id\r\n\r\nx\r\n"]
    with engine.begin() as c:
        c.execute(sa.insert(inbound), [
            {"received_at": now(), "source": "smtp", "rcpt_tos": ["s@example.com"],
             "size": len(raw), "sha256": str(i) * 64, "raw": raw, "state": state, "attempts": 0}
            for i, (raw, state) in enumerate(zip(raws, ["pending", "done", "pending"], strict=True))])
    command.upgrade(cfg, "0017")
    assert current_revision(engine) == "0017"
    with engine.connect() as c:
        got = c.exec_driver_sql("SELECT message_id, held_since FROM inbound ORDER BY id").all()
        indexes = {ix["name"] for ix in sa.inspect(c).get_indexes("inbound")}
    # The pending rows get their Message-ID (the done ones are never looked up by it)
    assert [tuple(r) for r in got] == [("reply@customer.test", None), (None, None), (None, None)]
    assert "ix_inbound_message_id" in indexes
    command.downgrade(cfg, "0016")
    with engine.connect() as c:
        columns = {col["name"] for col in sa.inspect(c).get_columns("inbound")}
        assert c.exec_driver_sql("SELECT count(*) FROM inbound").scalar() == 3
    assert not {"message_id", "held_since"} & columns
    command.upgrade(cfg, "head")
    with engine.connect() as c:
        assert c.exec_driver_sql("SELECT message_id FROM inbound ORDER BY id").scalars().all() \
            == ["reply@customer.test", None, None]
    engine.dispose()


def _count_holds(monkeypatch) -> Counter:  # type: ignore[no-untyped-def]
    holds: Counter = Counter()
    real = worker_mod.Worker._hold

    def _hold(self, rows, batch):  # type: ignore[no-untyped-def]
        for row in rows:
            if row.id in batch.held:
                holds[row.id] += 1
        return real(self, rows, batch)

    monkeypatch.setattr(worker_mod.Worker, "_hold", _hold)
    return holds


def test_a_message_that_names_itself_as_its_original_is_held_once_at_most(hx, monkeypatch):
    # Review finding: its own pending row was taken for an original in the queue and held
    # it again every 50 ms for the whole orphan wait (26-27 holds).
    holds = _count_holds(monkeypatch)
    [iid] = hx.put(mail("Alert", msgid="self@mon.test", In_Reply_To="<self@mon.test>"))
    hx.drain()
    assert hx.inbound(iid).state == "done"
    assert holds[iid] <= 1


def test_a_follow_up_to_an_agents_mailed_answer_is_held_once_at_most(home, monkeypatch):
    # Review finding: the agent's answer is stored on its ticket under our own Message-ID,
    # so its inbound row (done, on a ticket) named a Message-ID no article has: "stored
    # since the look-up, look again" held the follow-up every 50 ms (19-25 holds).
    from email import message_from_bytes

    from tests.test_agent_mail import AGENT, agent_reply, customer_opens_ticket, outgoing, setup

    h = setup(home)
    customer_opens_ticket(h)
    [note] = outgoing(h, AGENT)
    answer = agent_reply(note, "We are on our way.")
    answer_mid = message_from_bytes(answer)["Message-ID"]
    h.put(answer, rcpt=note["Reply-To"], mail_from=AGENT)
    h.drain()
    holds = _count_holds(monkeypatch)
    [iid] = h.put(mail("Re: Re: printer", "One more thing", sender="dave@customer.test",
                       msgid="followup@customer.test", In_Reply_To=answer_mid,
                       References=answer_mid))
    h.drain()
    assert h.inbound(iid).state == "done"
    assert holds[iid] <= 1


def test_a_long_non_ascii_message_id_is_accepted_stored_and_kept_under_the_index_limit(hx):
    # Review finding: 998 characters of CJK are ~3,000 bytes, over PostgreSQL's B-tree entry
    # limit (~2,700): the intake's insert failed and the message got 451 for ever. The
    # limit is in UTF-8 bytes now (mailgw.mail.ids), at intake and on the article.
    import random

    rnd = random.Random(1)
    long_id = "".join(chr(rnd.randint(0x4E00, 0x9FFF)) for _ in range(990)) + "@x.test"
    raw = mail("Grüße", msgid=long_id)
    assert message_id_of(raw) is None  # too long to be referred to: not stored at intake
    [iid] = hx.put(raw)
    hx.drain()
    row = hx.inbound(iid)
    assert row.state == "done", row.error
    [article] = [a for a in hx.articles() if a.inbound_id == iid]
    assert article.message_id and len(article.message_id.encode()) <= 998
    assert long_id.startswith(article.message_id)


def test_a_replayed_message_starts_its_hold_bound_afresh(hx):
    # Review note: a quarantined message that had been held kept held_since, so after a
    # replay the bound (HOLD_MAX) counted from its first life.
    from mailgw.queue import replay

    [iid] = hx.put(_reply())
    with hx.engine.begin() as conn:
        conn.execute(update(m.Inbound).where(m.Inbound.id == iid)
                     .values(state="quarantined", held_since=now() - timedelta(minutes=5)))
    assert replay(hx.engine, iid)
    row = hx.inbound(iid)
    assert (row.state, row.held_since, row.attempts) == ("pending", None, 0)
