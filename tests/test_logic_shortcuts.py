"""Shortcuts in the help desk logic's per-message path (issue 8, session 5): each gives what
the slow path gave, with less work. Both stores."""

from __future__ import annotations

from sqlalchemy import event

from tests.helpers import Harness, mail


def test_an_ack_in_a_ticket_opened_in_the_same_batch_finds_its_root_without_a_query(home):
    hx = Harness(home)
    seen: list[str] = []

    def _watch(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        seen.append(statement)
    try:
        first, reply, third = hx.put(
            mail("VPN down", msgid="v1@c"),
            mail("more", msgid="v2@c", References="<v1@c>"),
            mail("and more", msgid="v3@c", In_Reply_To="<v2@c>", References="<v1@c> <v2@c>"))
        event.listen(hx.engine, "before_cursor_execute", _watch)
        assert hx.worker.run_batch() == 3
        event.remove(hx.engine, "before_cursor_execute", _watch)
        [t] = hx.tickets()
        acks = [a for a in hx.articles(t.id) if a.direction == "out"]
        assert [a.references.split() for a in acks] == [
            ["v1@c"], ["v1@c", "v2@c"], ["v1@c", "v2@c", "v3@c"]]
        # The thread root of a ticket the batch opened is the batch's: no look-up in the store
        assert not [s for s in seen if "message_id IS NOT NULL" in s], seen
    finally:
        hx.close()


def test_an_ack_in_a_ticket_from_an_earlier_batch_still_reads_its_root_from_the_store(home):
    hx = Harness(home)
    try:
        hx.put(mail("VPN down", msgid="w1@c"))
        assert hx.worker.run_batch() == 1
        hx.put(mail("more", msgid="w2@c", References="<w1@c>"))
        assert hx.worker.run_batch() == 1
        [t] = hx.tickets()
        acks = [a for a in hx.articles(t.id) if a.direction == "out"]
        assert [a.references.split() for a in acks] == [["w1@c"], ["w1@c", "w2@c"]]
    finally:
        hx.close()


SLA = {"name": "standard", "first_response": 60, "update": 120, "solution": 480}


def test_a_new_tickets_clocks_go_in_with_one_statement_and_their_segments_name_them(home):
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from mailgw.store import models as m

    data = home.config()
    data["slas"] = [SLA]
    home.write_config(data)
    hx = Harness(home)
    seen: list[str] = []

    def _watch(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        seen.append(statement)
    try:
        hx.put(mail("Printer", msgid="p1@c"), mail("Scanner", msgid="s1@c"))
        event.listen(hx.engine, "before_cursor_execute", _watch)
        assert hx.worker.run_batch() == 2
        event.remove(hx.engine, "before_cursor_execute", _watch)
        # Two clocks a ticket (solution, first response), each in one statement
        assert len([s for s in seen if s.startswith("INSERT INTO sla_clocks")]) == 2
        with Session(hx.engine) as s:
            clocks = {c.id: c for c in s.scalars(select(m.SlaClock))}
            segments = list(s.scalars(select(m.SlaSegment)))
        assert sorted((c.ticket_id, c.target) for c in clocks.values()) == sorted(
            (t.id, target) for t in hx.tickets() for target in ("first_response", "solution"))
        # Each clock has its first segment, naming it and its ticket
        assert sorted(g.clock_id for g in segments) == sorted(clocks)
        for g in segments:
            clock = clocks[g.clock_id]
            assert g.ticket_id == clock.ticket_id
            assert g.reason == ("ticket created" if clock.target == "solution" else
                                "ticket opened by a message from alice@customer.test")
    finally:
        hx.close()


def test_a_follow_up_reads_its_tickets_clocks_without_flushing_the_batch(home):
    from sqlalchemy.orm import Session

    data = home.config()
    data["slas"] = [SLA]
    home.write_config(data)
    hx = Harness(home)
    flushes: list[int] = []

    def _flushed(session, context):  # type: ignore[no-untyped-def]
        flushes.append(len(session.new))
    try:
        hx.put(mail("Printer", msgid="f1@c"))
        assert hx.worker.run_batch() == 1
        [t] = hx.tickets()
        before = {(c.target, c.cycle): (c.state, c.id) for c in _clocks(hx, t.id)}
        hx.put(mail("Re: Printer", msgid="f2@c", In_Reply_To="<f1@c>"),
               mail("Re: Printer", msgid="f3@c", In_Reply_To="<f1@c>"))
        event.listen(Session, "after_flush", _flushed)
        try:
            assert hx.worker.run_batch() == 2
        finally:
            event.remove(Session, "after_flush", _flushed)
        # One flush, the batch's own at its end (not one more a follow-up)
        assert len(flushes) == 1
        assert [a.threaded_by for a in hx.articles(t.id) if a.direction == "in"] == [
            "new_ticket", "in_reply_to", "in_reply_to"]
        # The clocks are as they were: first response still running, no update cycle
        assert {(c.target, c.cycle): (c.state, c.id) for c in _clocks(hx, t.id)} == before
        assert before[("first_response", 0)][0] == "running"
    finally:
        hx.close()


def _clocks(hx: Harness, ticket_id: int):  # type: ignore[no-untyped-def]
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from mailgw.store import models as m

    with Session(hx.engine) as s:
        return list(s.scalars(select(m.SlaClock).where(m.SlaClock.ticket_id == ticket_id)))
