"""The worker's store transaction on PostgreSQL (issue 8, session 7, second round): one
statement text whatever the batch's size, so psycopg prepares it, and no catalog look-up per
id. PostgreSQL only; SQLite keeps its ``IN (...)`` lists (tests/test_store_batch.py)."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import event

from tests.helpers import mail, pg_harness


@pytest.fixture
def hx(home):  # type: ignore[no-untyped-def]
    yield from pg_harness(home)


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


def test_the_batchs_rows_go_in_with_one_statement_a_table(hx):
    # psycopg's executemany sends a Bind/Execute per row (the events: 3 a message); one
    # INSERT ... SELECT * FROM unnest(arrays) a table costs the server and the client less.
    sent: list[tuple[str, bool]] = []

    @event.listens_for(hx.engine, "before_cursor_execute")
    def _seen(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        sent.append((statement, executemany))

    hx.put(*[mail(f"Question {i}", sender=f"q{i}@customer.test", msgid=f"q{i}@c")
             for i in range(3)])
    hx.drain()
    event.remove(hx.engine, "before_cursor_execute", _seen)
    for table in ("events", "outbox", "auto_replies", "tickets"):
        inserts = [(s, many) for s, many in sent if s.startswith(f"INSERT INTO {table} ")]
        assert len(inserts) == 1, (table, inserts)
        assert "unnest(" in inserts[0][0] and not inserts[0][1], table
    assert len(hx.tickets()) == 3 and len(hx.outbox()) == 3


def _as_text(conn, table, ids):  # type: ignore[no-untyped-def]
    """Every column but the id of the rows ``ids``, as the server prints them (a JSON value
    as stored, byte for byte)."""
    from sqlalchemy import text

    from mailgw.store import models as m

    cols = [c.name for c in m.Base.metadata.tables[table].columns if c.name != "id"]
    build = ", ".join(f'"{c}"' for c in cols)
    return [r[0] for r in conn.execute(text(
        f"SELECT json_build_array({build})::text FROM {table} WHERE id = ANY(:ids) ORDER BY id"),
        {"ids": ids})]


def test_rows_inserted_from_arrays_are_those_an_executemany_inserts(hx):
    from datetime import UTC, datetime, timedelta, timezone

    from mailgw.batch import _statements, insert_rows

    at = datetime(2026, 11, 27, 12, 0, 1, 123456, tzinfo=UTC)
    samples = {
        "events": [dict(type="article_received", created_at=at, data={"a": "é\u2028", "n": [1]},
                        inbound_id=None, ticket_id=None, article_id=None),
                   dict(type="x" * 64, created_at=at.astimezone(timezone(timedelta(hours=5))),
                        data=None, inbound_id=None, ticket_id=None, article_id=None),
                   dict(type="", created_at=at, data={}, inbound_id=None, ticket_id=None,
                        article_id=None)],
        # naive and aware times in one batch (a binary array cannot hold both)
        "events ": [dict(type="naive", created_at=at.replace(tzinfo=None), data=[],
                         inbound_id=None, ticket_id=None, article_id=None),
                    dict(type="aware", created_at=at, data=[], inbound_id=None,
                         ticket_id=None, article_id=None)],
        "auto_replies": [dict(recipient="Ä@x.test", ticket_id=None, created_at=at),
                         dict(recipient="b@x.test", ticket_id=None, created_at=at)],
        "tickets": [dict(number=f"N{i}", title="t\x01 'q' \"d\" \\", queue="support",
                         state="new", priority=3, customer="c@x.test", owner=None, created_at=at,
                         updated_at=at, closed_at=None, type=None, service=None,
                         category=None, tags=["a", None], custom_fields={"k": {"v": 1.5}},
                         company=None, urgency=None, impact=None, sla=None, sla_reason=None,
                         pending_until=None, pending_action=None, merged_into=None)
                    for i in range(2)],
    }
    with hx.engine.begin() as conn:
        for n, (label, rows) in enumerate(samples.items()):
            table = label.strip()
            a = [dict(row, id=10_000 + 10 * n + i) for i, row in enumerate(rows)]
            b = [dict(row, id=20_000 + 10 * n + i) for i, row in enumerate(rows)]
            if table == "tickets":
                b = [dict(row, number=row["number"] + "b") for row in b]
            insert_rows(conn, table, a, True)
            conn.execute(_statements(True)[f"insert {table}"], b)
            got_a = _as_text(conn, table, [r["id"] for r in a])
            got_b = _as_text(conn, table, [r["id"] for r in b])
            if table == "tickets":
                got_b = [t.replace('b", ', '", ', 1) for t in got_b]
            assert got_a == got_b, table


def test_a_value_too_long_for_its_column_is_refused_as_before(hx):
    # The arrays are cast without the column's length: the INSERT checks it, as it checks a
    # single value (an explicit cast to varchar(n) would cut the value silently).
    from datetime import UTC, datetime

    from sqlalchemy.exc import DataError

    from mailgw.batch import insert_rows

    at = datetime.now(UTC)
    rows = [dict(id=30_000 + i, type="t" * (64 + i), created_at=at, data={}, inbound_id=None,
                 ticket_id=None, article_id=None) for i in range(2)]
    with pytest.raises(DataError), hx.engine.begin() as conn:
        insert_rows(conn, "events", rows, True)


def test_a_listed_value_longer_than_its_column_is_compared_whole(hx):
    # The array is cast without the column's length: a cast to varchar(320)[] would cut a
    # 321-character key to the 320 characters a stored address could equal (IN compared it
    # whole).
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import text

    from mailgw.batch import _statements

    at = datetime.now(UTC)
    address = "a" * 313 + "@x.test"  # 320 characters, the column's length
    with hx.engine.begin() as conn:
        conn.execute(text("INSERT INTO address_holds (address, kind, reason, until, created_at) "
                          "VALUES (:a, 'bounce', 'r', :u, :c)"),
                     {"a": address, "u": at + timedelta(days=1), "c": at})
        q = _statements(True)["holds"]
        assert [r[0] for r in conn.execute(q, {"keys": [address], "at": at})] == [address]
        assert list(conn.execute(q, {"keys": [address + "z"], "at": at})) == []


def test_a_column_mixing_python_types_goes_in_as_an_executemany_would(hx):
    # psycopg cannot make one binary array of 5 and "x" (review, session 7): such rows take
    # the executemany, which PostgreSQL accepts (an integer assigned to a text column).
    from datetime import UTC, datetime

    from mailgw.batch import insert_rows

    at = datetime.now(UTC)
    rows = [dict(id=40_000 + i, type=t, created_at=at, data={}, inbound_id=None,
                 ticket_id=None, article_id=None) for i, t in enumerate([5, "five"])]
    with hx.engine.begin() as conn:
        insert_rows(conn, "events", rows, True)
        got = conn.exec_driver_sql("SELECT type FROM events WHERE id >= 40000 ORDER BY id").all()
    assert [r[0] for r in got] == ["5", "five"]
