"""The worker's batch and threading (issue 8, session 5): what threading asks the store is
asked once for the batch (``mailgw.threader.ThreadIndex``), the batch's own rows are read
from memory without a flush, and on PostgreSQL the tickets a batch leads to are locked in id
order before its first message, so two workers never deadlock on them."""

from __future__ import annotations

import logging
import threading

import pytest
from sqlalchemy import event

from mailgw import worker as worker_mod
from mailgw.numbers import format_number
from mailgw.process import Context
from mailgw.queue import now
from mailgw.worker import Worker
from tests.helpers import Harness, mail


@pytest.fixture
def hx(home):  # type: ignore[no-untyped-def]
    h = Harness(home)
    yield h
    h.close()


@pytest.fixture
def hx_no_wait(home):  # type: ignore[no-untyped-def]
    # A reply to a message never received is threaded at once, without the wait for an
    # original a moment behind it (worker.orphan_reply_wait, decision 31).
    home.update_config(worker={"orphan_reply_wait": 0})
    h = Harness(home)
    yield h
    h.close()


def _ticket_of(hx: Harness, iid: int) -> tuple[int, str, str]:
    row = hx.inbound(iid)
    [article] = [a for a in hx.articles() if a.id == row.article_id]
    return row.ticket_id, article.threaded_by, article.thread_reason


def test_one_batch_threads_as_the_store_would_and_asks_once(hx_no_wait):
    hx = hx_no_wait  # "Lost" below refers to a message never received
    # Stored before the batch: alice's ticket, and bob's reply on it.
    [s1] = hx.put(mail("Printer", msgid="s1@c"))
    hx.drain()
    [s2] = hx.put(mail("Re: Printer", sender="bob@customer.test", msgid="s2@c",
                       In_Reply_To="<s1@c>"))
    hx.drain()
    t1 = hx.inbound(s1).ticket_id
    assert hx.inbound(s2).ticket_id == t1
    n1 = hx.tickets()[0].number
    cfg = hx.settings.ticket_numbers
    # The batch's first message opens the next ticket; its number is known in advance.
    n2 = format_number(cfg, t1 + 1, now())
    raws = [
        mail("Fresh", msgid="m1@c"),                                              # new
        mail("Re: Fresh", msgid="m2@c", In_Reply_To="<m1@c>"),                    # batch's
        mail(f"[Ticket#{n2}] more", msgid="m3@c"),                                # its number
        mail(f"[Ticket#{n1}] hi", sender="carol@customer.test", msgid="m4@c"),    # stranger
        mail(f"[Ticket#{n1}] again", sender="bob@customer.test", msgid="m5@c"),   # stored art.
        mail(f"[Ticket#{n2}] me too", sender="dave@customer.test", msgid="m6@c"),  # stranger
        mail("Lost", sender="erin@customer.test", msgid="m7@c", References="<x@c>"),
        mail("Both", msgid="m8@c", References="<s1@c> <m1@c>"),                  # newest ref
        mail("[Ticket#2000010199999999] x", sender="frank@customer.test", msgid="m9@c"),
        mail("Re: Fresh", sender="bob@customer.test", msgid="m10@c", In_Reply_To="<m1@c>"),
        mail(f"[Ticket#{n2}] bob", sender="bob@customer.test", msgid="m11@c"),    # batch art.
        mail("Re: Printer", msgid="m12@c", In_Reply_To="<s2@c>"),                 # stored
    ]
    ids = hx.put(*raws)
    asked = []

    @event.listens_for(hx.engine, "before_cursor_execute")
    def _count(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
        if any(what in statement for what in (
                "articles.message_id IN", "tickets.number IN", "tickets.number =",
                "articles.message_id = ANY")):
            asked.append(statement)

    assert hx.worker.run_batch() == len(raws)  # one batch
    event.remove(hx.engine, "before_cursor_execute", _count)
    assert len(asked) == 2  # the batch's Message-IDs and ticket numbers, once each
    got = [_ticket_of(hx, i) for i in ids]
    t2 = got[0][0]
    assert t2 == t1 + 1
    assert got[0][1] == "new_ticket"
    assert got[1][:2] == (t2, "in_reply_to")
    assert got[2][:2] == (t2, "subject_number")
    assert got[3][1] == "new_ticket" and got[3][0] not in (t1, t2)
    assert "but carol@customer.test is not on that ticket" in got[3][2]
    assert got[4][:2] == (t1, "subject_number")
    assert got[5][1] == "new_ticket" and "dave@customer.test is not on" in got[5][2]
    assert got[6][1] == "new_ticket"
    assert got[6][2] == "none of 1 referenced Message-ID(s) is known"
    assert got[7][:2] == (t2, "references") and "<m1@c>" in got[7][2]
    assert got[8][1] == "new_ticket" and "which does not exist" in got[8][2]
    assert got[9][:2] == (t2, "in_reply_to")
    assert got[10][:2] == (t2, "subject_number")  # bob wrote on it earlier in the batch
    assert got[11][:2] == (t1, "in_reply_to")
    # The acknowledgements' References lead with each ticket's first message.
    acks = {a.in_reply_to: a for a in hx.articles() if a.direction == "out"}
    assert acks["m12@c"].references.split()[0] == "s1@c"
    assert acks["m2@c"].references.split()[0] == "m1@c"
    assert acks["m5@c"].references.split()[0] == "s1@c"


@pytest.mark.timeout(60)
def test_two_batches_replying_to_the_same_tickets_in_opposite_orders_do_not_deadlock(
        hx, monkeypatch, caplog):
    # PostgreSQL: batch A replies to ticket 1 (a flush mid-batch: its second message refers
    # to its first) and then to ticket 2; batch B the other way round. Both wait for each
    # other after their last message, so each holds its first ticket and then wants the
    # other's: on main a deadlock (1 s deadlock_timeout, the loser's batch stored again).
    # The batches lock the tickets they lead to in id order before their first message:
    # B waits for A's commit instead.
    if hx.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer: two transactions cannot overlap")
    t1_raw = mail("One", msgid="t1@c")
    t2_raw = mail("Two", sender="bob@customer.test", msgid="t2@c")
    hx.put(t1_raw, t2_raw)
    hx.drain()
    ctx = Context(hx.settings, hx.renderer)
    a = Worker(hx.engine, lambda: ctx, batch_size=3, max_attempts=3)
    b = Worker(hx.engine, lambda: ctx, batch_size=3, max_attempts=3)
    b.me = a.me + "-b"
    ready = threading.Barrier(2, timeout=3)
    started = threading.Event()
    real = worker_mod.process
    done: dict[str, int] = {}

    def process(session, row, *args, **kw):  # type: ignore[no-untyped-def]
        started.set()
        real(session, row, *args, **kw)
        done[threading.current_thread().name] = done.get(threading.current_thread().name, 0) + 1
        if done[threading.current_thread().name] == 3:
            try:
                ready.wait()  # both batches processed, neither written yet
            except threading.BrokenBarrierError:
                pass  # the other waits for this one's tickets

    monkeypatch.setattr(worker_mod, "process", process)
    caplog.set_level(logging.INFO, logger="mailgw.worker")
    a_ids = hx.put(mail("Re: One", msgid="a1@c", In_Reply_To="<t1@c>"),
                   mail("Re: One", msgid="a2@c", In_Reply_To="<a1@c>"),
                   mail("Re: Two", sender="bob@customer.test", msgid="a3@c",
                        In_Reply_To="<t2@c>"))
    ta = threading.Thread(target=a.run_batch, name="A")
    ta.start()
    assert started.wait(20)  # A has claimed its three
    b_ids = hx.put(mail("Re: Two", sender="bob@customer.test", msgid="b1@c",
                        In_Reply_To="<t2@c>"),
                   mail("Re: Two", sender="bob@customer.test", msgid="b2@c",
                        In_Reply_To="<b1@c>"),
                   mail("Re: One", msgid="b3@c", In_Reply_To="<t1@c>"))
    tb = threading.Thread(target=b.run_batch, name="B")
    tb.start()
    ta.join(30)
    tb.join(30)
    assert not [r for r in caplog.records if "rolled back" in r.getMessage()]
    t1, t2 = (t.id for t in hx.tickets())
    assert [hx.inbound(i).ticket_id for i in a_ids] == [t1, t1, t2]
    assert [hx.inbound(i).ticket_id for i in b_ids] == [t2, t2, t1]
    assert [hx.inbound(i).attempts for i in a_ids + b_ids] == [1] * 6


def test_a_batch_writes_its_tickets_and_articles_with_one_statement_each(hx):
    # New tickets go in together before the flush that writes their articles, the customer's
    # articles in one INSERT (no RETURNING per row); PostgreSQL takes the batch's ids in one
    # statement, and ticket numbers stay without gaps.
    [first] = hx.put(mail("Old", msgid="old@c"))
    hx.drain()
    raws = [mail(f"New {i}", sender=f"c{i}@customer.test", msgid=f"n{i}@c") for i in range(5)]
    raws += [mail("Re: Old", msgid="r1@c", In_Reply_To="<old@c>"),
             mail("Re: New 0", sender="c0@customer.test", msgid="r2@c", In_Reply_To="<n0@c>")]
    ids = hx.put(*raws)
    seen: list[str] = []

    @event.listens_for(hx.engine, "before_cursor_execute")
    def _count(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
        seen.append(statement)

    assert hx.worker.run_batch() == len(raws)
    event.remove(hx.engine, "before_cursor_execute", _count)
    assert len([s for s in seen if s.startswith("INSERT INTO tickets")]) == 1
    assert len([s for s in seen if s.startswith("INSERT INTO articles")]) == 2  # theirs, ours
    assert not [s for s in seen if s.startswith("INSERT INTO articles") and "RETURNING" in s]
    if hx.engine.dialect.name == "postgresql":
        assert len([s for s in seen if "nextval" in s]) == 1
    tickets = hx.tickets()
    assert [t.id for t in tickets] == list(range(tickets[0].id, tickets[0].id + 6))
    old = hx.inbound(first).ticket_id
    got = [hx.inbound(i).ticket_id for i in ids]
    assert got[5] == old and got[6] == got[0]
    assert len(set(got[:5])) == 5 and old not in got[:5]
    # What the new tickets were given after they were made (the ack's article, the flush's
    # UPDATE of updated_at for a follow-up in the same batch) is what is stored.
    assert all(t.number and t.state == "new" for t in tickets[1:])


def _merge_in_one_batch(home, merge_first: bool):  # type: ignore[no-untyped-def]
    """Tickets A and B of one customer, then in ONE worker batch an agent's ``#merge`` of A
    into B and a customer follow-up on A (threaded by In-Reply-To), in the order given.
    Returns (harness, A, B, inbound id of the follow-up)."""
    from tests.test_agent_mail import AGENT, agent_reply, outgoing, setup

    h = setup(home)
    h.put(mail("Printer on fire", sender="carol@customer.test", msgid="first@customer.test"))
    h.drain()
    h.put(mail("Scanner on fire", sender="carol@customer.test", msgid="second@customer.test"))
    h.drain()
    a, b = h.tickets()
    note = outgoing(h, AGENT)[0]
    assert note["X-Mailgw-Ticket"] == a.number
    merge = lambda: h.put(agent_reply(note, f"#merge Ticket#{b.number}\nSame fire."),  # noqa: E731
                          rcpt=note["Reply-To"], mail_from=AGENT)
    follow_up = lambda: h.put(mail(  # noqa: E731
        "Re: Printer on fire", sender="carol@customer.test", msgid="third@customer.test",
        In_Reply_To="<first@customer.test>"))
    ids = [*merge(), *follow_up()] if merge_first else [*follow_up(), *merge()]
    assert h.worker.run_batch() == 2  # one batch
    assert [h.inbound(i).state for i in ids] == ["done", "done"]
    return h, a, b, ids[1] if merge_first else ids[0]


def test_a_merge_in_the_batch_sends_threading_back_to_the_store(home):
    # An agent's #merge moves a ticket's articles (an UPDATE through the session): a later
    # message of the same batch that refers to one of them is threaded as the store now
    # says (the article is on the target ticket), not as the batch's index said before.
    h, _, b, follow_up = _merge_in_one_batch(home, merge_first=True)
    ticket_id, by, reason = _ticket_of(h, follow_up)
    assert (ticket_id, by) == (b.id, "in_reply_to")
    assert reason == f"In-Reply-To <first@customer.test> is on ticket {b.number}"


def test_a_merge_in_the_batch_moves_the_acknowledgement_the_batch_has_not_written(home):
    # A follow-up on ticket A gets its acknowledgement (a row the batch writes at its end);
    # an agent's #merge of A into B later in the same batch must move it with A's stored
    # articles, as it would if the two mails came in two batches (review, 2026-11-27).
    h, a, _, _ = _merge_in_one_batch(home, merge_first=False)
    assert [x.id for x in h.articles() if x.ticket_id == a.id] == []


def test_the_store_steps_statements_are_built_once(hx):
    # Building a statement (and its cache key) cost more than running it on SQLite, ~0.1 ms
    # each (bench/RESULTS.md, issue 8 session 7): the batch's look-ups (the batch's rows, the
    # ids it continues from, threading's and the loop counts' questions) are built once and
    # run with new parameters, batch after batch.
    from sqlalchemy.sql import Select

    seen: dict[str, set[int]] = {}
    keep: list[object] = []  # the statements stay alive: ids are not reused

    @event.listens_for(hx.engine, "before_execute")
    def _seen(conn, clauseelement, *args):  # type: ignore[no-untyped-def]
        if isinstance(clauseelement, Select):
            keep.append(clauseelement)
            seen.setdefault(str(clauseelement), set()).add(id(clauseelement))

    number = None
    for i in range(3):
        replies = [mail(f"Re: [Ticket#{number}] New {i - 1}", sender=f"c{i - 1}@customer.test",
                        msgid=f"r{i}@c", In_Reply_To=f"<n{i - 1}@c>")] if i else []
        hx.put(mail(f"New {i}", sender=f"c{i}@customer.test", msgid=f"n{i}@c"), *replies)
        hx.drain()
        number = hx.tickets()[-1].number
    event.remove(hx.engine, "before_execute", _seen)
    mine = [sql for sql in seen if any(what in sql for what in (
        "FROM auto_replies", "FROM address_holds", "max(tickets.id)", "FROM articles",
        "tickets.number IN", "inbound.claimed_by = ", "inbound.message_id IN",
        "inbound.sha256 IN", "tickets.number = ANY", "inbound.message_id = ANY",
        "inbound.sha256 = ANY"))]
    assert len(mine) >= 8
    assert {sql.split("FROM")[1][:40]: len(seen[sql]) for sql in mine} == {
        sql.split("FROM")[1][:40]: 1 for sql in mine}
