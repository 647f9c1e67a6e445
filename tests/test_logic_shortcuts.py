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
