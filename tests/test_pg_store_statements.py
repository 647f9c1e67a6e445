"""The worker's store transaction on PostgreSQL (issue 8, session 7, second round): one
statement text whatever the batch's size, so psycopg prepares it, and no catalog look-up per
id. PostgreSQL only; SQLite keeps its ``IN (...)`` lists (tests/test_store_batch.py)."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import event

from tests.helpers import Harness, mail


@pytest.fixture
def hx(home):  # type: ignore[no-untyped-def]
    if not home.store_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    h = Harness(home)
    yield h
    h.close()


def _batches_of_growing_size(hx) -> list[str]:  # type: ignore[no-untyped-def]
    """Every statement sent while three batches of 1, 2 and 3 messages are stored (new
    tickets, replies to the previous batch's mails, a ticket number)."""
    seen: list[str] = []

    @event.listens_for(hx.engine, "before_cursor_execute")
    def _seen(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
        seen.append(statement)

    number = None
    for size in (1, 2, 3):
        raws = [mail(f"New {size}.{i}", sender=f"c{size}{i}@customer.test",
                     msgid=f"n{size}.{i}@c",
                     **({"In_Reply_To": f"<n{size - 1}.0@c>"} if i else {}))
                for i in range(size - (number is not None))]
        if number is not None:
            raws.append(mail(f"[Ticket#{number}] more", sender="c10@customer.test",
                             msgid=f"t{size}@c"))
        hx.put(*raws)
        hx.drain()
        number = hx.tickets()[0].number
    event.remove(hx.engine, "before_cursor_execute", _seen)
    assert len(hx.tickets()) >= 3
    return seen


def test_the_store_steps_look_ups_keep_one_text_whatever_the_batch_size(hx):
    # An IN list was a new statement text per list length: parsed and planned every time,
    # never prepared. ``= ANY(array)`` keeps one text.
    seen = _batches_of_growing_size(hx)
    for what in ("inbound.sha256", "inbound.message_id", "articles.message_id",
                 "tickets.number", "auto_replies.recipient", "address_holds.address",
                 "articles.ticket_id"):
        texts = {s for s in seen if f"{what} IN (" in s or f"{what} = ANY" in s}
        assert len(texts) == 1, (what, texts)
        assert f"{what} = ANY" in next(iter(texts)), what
    # The batch's rows (the store step) and their envelopes (the parse step) by inbound id.
    # (The claim's UPDATE is another part's: mailgw/worker.py _claim_in.)
    assert not any(s.lstrip().startswith("SELECT") and "inbound.id IN (" in s for s in seen)
    assert len({s for s in seen if "inbound.id = ANY" in s}) == 2


def test_ids_are_taken_from_named_sequences_with_one_statement_text(hx):
    # nextval(pg_get_serial_sequence(...)) looked the sequence up in the catalog for every id
    # (462 us of server CPU for a batch's 169 ids; 112 with the sequence named).
    seen = _batches_of_growing_size(hx)
    takes = [s for s in seen if "nextval" in s]
    assert takes and len(set(takes)) == 1
    assert not any(re.search(r"nextval\s*\(\s*pg_get_serial_sequence", s) for s in takes)
    # The sequences are looked up once per connection (the harness's worker uses one).
    assert sum("pg_get_serial_sequence" in s for s in seen) <= 1
