"""What keeps ingest at the same cost when the store holds a million tickets (issue 8):

- every SELECT the worker issues for a message, follow-ups included (threading by
  Message-ID and by the ticket number, the sender and root-article lookups, the loop
  protection counts, the redelivery check, the claim), can be answered from an index: the
  plan of each statement, exactly as it was sent, has no full scan of a table;
- on PostgreSQL a ticket's pages keep room for its updates, so the update a follow-up makes
  (``updated_at``) is a HOT update: the same page, no new index entries (migration 0010).

Speed itself is measured in bench/scale.py, not here.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, insert, select, text, update
from sqlalchemy.orm import Session

from mailgw.numbers import format_number
from mailgw.store import models as m
from tests.helpers import Harness, mail

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _preload(engine, cfg, count: int) -> None:  # type: ignore[no-untyped-def]
    """``count`` older tickets, each with the customer's message and our acknowledgement."""
    tickets, articles = [], []
    for i in range(1, count + 1):
        at = T0 + timedelta(seconds=i)
        tickets.append({"id": 10_000 + i, "number": format_number(cfg, 10_000 + i, at),
                        "title": f"old {i}", "queue": "support", "state": "open", "priority": 3,
                        "customer": f"old{i}@customer.test", "created_at": at, "updated_at": at,
                        "tags": [], "custom_fields": {}})
        for k, (direction, mid) in enumerate((("in", f"old.{i}@customer.test"),
                                              ("out", f"ours.{i}@example.com"))):
            articles.append({"id": 100_000 + 2 * i + k, "ticket_id": 10_000 + i,
                             "direction": direction, "sender_type": "customer",
                             "from_addr": f"old{i}@customer.test", "subject": f"old {i}",
                             "message_id": mid, "threaded_by": "new_ticket", "created_at": at})
    # Their messages, processed: a store's inbound table is almost all "done", and ANALYZE
    # says so to the planner (a look for pending rows must still use an index).
    inbound = [{"id": 50_000 + i, "received_at": T0 + timedelta(seconds=i), "source": "smtp",
                "mail_from": f"old{i}@customer.test", "rcpt_tos": ["support@example.com"],
                "size": 10, "sha256": f"{i:064x}", "raw": b"old", "state": "done",
                "attempts": 1, "ticket_id": 10_000 + i, "message_id": f"old.{i}@customer.test"}
               for i in range(1, count + 1)]
    with engine.begin() as c:
        c.execute(insert(m.Ticket), tickets)
        c.execute(insert(m.Article), articles)
        c.execute(insert(m.Inbound), inbound)
    with engine.begin() as c:
        c.exec_driver_sql("ANALYZE")


def _full_scans(conn, statement: str, params, partial: set[str]) -> list[str]:  # type: ignore[no-untyped-def]
    """The parts of the statement's plan that read a whole table or a whole index."""
    if conn.dialect.name == "sqlite":
        # "SCAN t" or "SCAN t USING INDEX i" walks all of it; "SEARCH" is a lookup.
        rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params).all()
        return [r[-1] for r in rows if re.match(r"SCAN (?!CONSTANT ROW)", r[-1])]
    plan = conn.exec_driver_sql("EXPLAIN (COSTS OFF, FORMAT JSON) " + statement,
                                params).scalar()
    bad: list[str] = []

    def walk(node: dict) -> None:  # type: ignore[type-arg]
        kind = node["Node Type"]
        if kind == "Seq Scan":
            bad.append(f"Seq Scan on {node['Relation Name']}")
        # An index scan without an index condition reads the whole index (ordered by it),
        # unless the index is partial: then its predicate is the condition.
        elif (kind in ("Index Scan", "Index Only Scan", "Bitmap Index Scan")
              and "Index Cond" not in node and node["Index Name"] not in partial):
            bad.append(f"{kind} using {node['Index Name']} without a condition")
        for child in node.get("Plans", []):
            walk(child)

    walk((plan if isinstance(plan, list) else json.loads(plan))[0]["Plan"])
    return bad


def test_every_select_of_the_worker_uses_an_index(home):
    h = Harness(home)
    cfg = h.settings.ticket_numbers
    _preload(h.engine, cfg, 300)
    first = format_number(cfg, 10_007, T0 + timedelta(seconds=7))
    # Warm up: a new ticket (its statements are among those below too).
    h.put(mail("A new question", sender="new@customer.test", msgid="n1@customer.test"))
    h.drain()

    seen: list[tuple[str, object]] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    event.listen(h.engine, "before_cursor_execute", record)
    try:
        h.put(
            # A follow-up by In-Reply-To (our acknowledgement's Message-ID) and References.
            mail("Re: old 5", sender="old5@customer.test", msgid="r1@customer.test",
                 In_Reply_To="<ours.5@example.com>", References="<old.5@customer.test>"),
            # A follow-up by the ticket number in the subject only.
            mail(f"Re: [Ticket#{first}] old 7", sender="old7@customer.test",
                 msgid="r2@customer.test"),
            # A stranger quoting a number: the sender check has to look at the articles.
            mail(f"Re: [Ticket#{first}] old 7", sender="stranger@else.test",
                 msgid="r3@customer.test"),
            mail("Another new one", sender="new2@customer.test", msgid="n2@customer.test"),
            # A reply to a message never received: held back once, looked for in the queue
            # (decision 31), then a new ticket.
            mail("Re: lost", sender="lost@customer.test", msgid="r4@customer.test",
                 In_Reply_To="<never@customer.test>"),
        )
        h.drain()
    finally:
        event.remove(h.engine, "before_cursor_execute", record)

    by_thread = {a.message_id: a.threaded_by for a in h.articles()}
    assert by_thread["r1@customer.test"] == "in_reply_to"
    assert by_thread["r2@customer.test"] == "subject_number"
    assert by_thread["r3@customer.test"] == "new_ticket"
    assert by_thread["r4@customer.test"] == "new_ticket"

    statements = {s for s, _ in seen}
    # Not vacuous: the lookups that matter were issued and are checked below.
    # The batch asks threading once (mailgw/threader.py ThreadIndex): ticket numbers with IN,
    # the tickets, their first articles and their loop counts for the whole batch.
    for needle in ("articles.message_id IN", "tickets.number IN", "articles.from_addr =",
                   "FROM auto_replies", "inbound.sha256 IN", "inbound.state =",
                   "min(articles.id)", "auto_replies.ticket_id IN", "tickets.id IN",
                   "inbound.message_id IN"):
        # On PostgreSQL the worker's lists are ``= ANY(array)`` (one statement text).
        alt = needle[:-3] + " = ANY" if needle.endswith(" IN") else needle
        assert any(needle in s or alt in s for s in statements), needle

    bad, checked = {}, 0
    with h.engine.connect() as conn:
        partial: set[str] = set()
        if conn.dialect.name == "postgresql":
            # Where an index can serve, the plan uses it: what remains is a real scan.
            conn.exec_driver_sql("SET enable_seqscan = off")
            partial = set(conn.scalars(text(
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() "
                "AND indexdef LIKE '% WHERE %'")))
            assert "ix_inbound_pending" in partial
        for statement, params in seen:
            if not re.search(r"\bFROM\b", statement, re.IGNORECASE):
                continue  # SELECT pg_advisory_xact_lock(...) and the like
            checked += 1
            scans = _full_scans(conn, statement, params, partial)
            if scans:
                bad[" ".join(statement.split())[:200]] = scans
        conn.rollback()
    h.close()
    assert checked >= 10
    assert bad == {}


def _updates(session: Session) -> tuple[int, int]:
    """Rows of ``tickets`` updated so far by this connection (not yet published to the
    statistics), and how many of those updates were HOT."""
    return session.execute(text(
        "SELECT pg_stat_get_xact_tuples_updated('tickets'::regclass), "
        "pg_stat_get_xact_tuples_hot_updated('tickets'::regclass)")).one()


def test_a_follow_up_updates_its_ticket_in_place_on_postgresql(home):
    """The tickets table keeps free room in its pages (fillfactor), so bumping ``updated_at``
    of an old ticket, as every follow-up does, is a HOT update. With full pages each such
    update added an entry to all six indexes of ``tickets`` at random places."""
    if not home.store_url.startswith("postgresql"):
        pytest.skip("a PostgreSQL storage setting (SQLite updates rows in place)")
    h = Harness(home)
    _preload(h.engine, h.settings.ticket_numbers, 600)  # some 20 full pages
    with h.engine.connect() as c:
        options = c.scalar(text("SELECT reloptions FROM pg_class "
                                "WHERE oid = 'tickets'::regclass"))
    assert "fillfactor=85" in (options or [])

    ids = list(range(10_001, 10_601, 6))  # one ticket in six, on every page
    with Session(h.engine) as s, s.begin():
        before = _updates(s)
        for tid in ids:
            ticket = s.get(m.Ticket, tid)
            ticket.updated_at = datetime.now(UTC)
        s.flush()
        updated, hot = (a - b for a, b in zip(_updates(s), before, strict=True))
    assert updated == len(ids)
    assert hot == len(ids)

    # A change of an indexed column is not HOT, and cannot be: the check above can fail.
    with Session(h.engine) as s, s.begin():
        before = _updates(s)
        s.execute(update(m.Ticket).where(m.Ticket.id.in_(ids[:5])).values(state="closed"))
        updated, hot = (a - b for a, b in zip(_updates(s), before, strict=True))
    assert (updated, hot) == (5, 0)
    with Session(h.engine) as s:
        assert s.scalar(select(m.Ticket.state).where(m.Ticket.id == ids[0])) == "closed"
    h.close()


def test_the_claim_updates_the_inbound_rows_in_place_on_postgresql(home):
    """inbound's pages keep half their room (fillfactor 50, migration 0020), so the claim of
    a batch (attempts, lease) is a HOT update: no entry in the five indexes of inbound, only
    the changed bytes in the WAL. With full pages most claimed rows moved to another page."""
    from mailgw.queue import now
    from mailgw.worker import Worker

    if not home.store_url.startswith("postgresql"):
        pytest.skip("a PostgreSQL storage setting (SQLite updates rows in place)")
    h = Harness(home)
    h.put(*[mail(f"q {i}", msgid=f"q{i}@c", sender=f"c{i}@customer.test") for i in range(120)])
    w = Worker(h.engine, h.worker.context, batch_size=120, max_attempts=3)

    def updates(s: Session) -> tuple[int, int]:
        return s.execute(text(
            "SELECT pg_stat_get_xact_tuples_updated('inbound'::regclass), "
            "pg_stat_get_xact_tuples_hot_updated('inbound'::regclass)")).one()

    with Session(h.engine) as s, s.begin():
        before = updates(s)
        ids = w._claim_in(s, now(), first=True)
        updated, hot = (a - b for a, b in zip(updates(s), before, strict=True))
    assert len(ids) == 120
    assert (updated, hot) == (120, 120)
    # The state index holds quarantined rows only (the claim and the look for pending rows
    # use ix_inbound_pending): an inbound row's versions add no entry to it.
    with h.engine.connect() as c:
        indexdef = c.scalar(text("SELECT indexdef FROM pg_indexes WHERE schemaname = "
                                 "current_schema() AND indexname = 'ix_inbound_state'"))
        assert "WHERE" in indexdef and "quarantined" in indexdef
        c.exec_driver_sql("SET enable_seqscan = off")
        plan = "\n".join(c.scalars(text(
            "EXPLAIN SELECT id FROM inbound WHERE state = 'quarantined' ORDER BY id")))
        assert "ix_inbound_state" in plan
    h.close()


def test_the_look_for_pending_rows_uses_an_index_in_a_store_of_done_mail(home):
    """SQLite, statistics of a store of a million processed messages (ANALYZE: every row of
    inbound has the same state): the worker's look for pending rows before it takes the
    write lock must still search the state index. Without ORDER BY the planner chose a
    full scan there: 93 ms a look at 1M messages (bench/scale.py, 2026-11-27)."""
    from mailgw.queue import now
    from mailgw.worker import Worker

    h = Harness(home)
    if h.engine.dialect.name != "sqlite":
        h.close()
        pytest.skip("SQLite's planner and its sqlite_stat1")
    with h.engine.begin() as c:
        c.exec_driver_sql("ANALYZE")
        c.exec_driver_sql("DELETE FROM sqlite_stat1 WHERE tbl = 'inbound'")
        c.exec_driver_sql("INSERT INTO sqlite_stat1 VALUES ('inbound', 'ix_inbound_state', "
                          "'1000000 1000000'), ('inbound', 'ix_inbound_sha256', '1000000 1')")
    h.engine.dispose()  # new connections read the statistics
    from mailgw.worker import _SQLITE_CLAIMABLE, _SQLITE_LOOK, _sqlite_time

    worker = Worker(h.engine, lambda: None, batch_size=64, max_attempts=3)  # type: ignore[arg-type, return-value]
    assert worker._waiting(now()) == 0
    # The look and the claim's read go through the driver (issue 8, session 7): their SQL.
    for statement in (_SQLITE_LOOK, _SQLITE_CLAIMABLE):
        with h.engine.connect() as conn:
            assert _full_scans(conn, statement, ("pending", _sqlite_time(now()), 32),
                               set()) == [], statement
    h.close()


def test_the_look_for_a_replys_original_in_the_queue_uses_an_index_in_a_store_of_done_mail(home):
    """As above, for the batch's look for the originals its replies wait for (decision 31:
    ``inbound.message_id IN (...)``, the state filtered in Python so the planner cannot
    prefer the pending rows, however many): SQLite statistics of a million done messages,
    one per Message-ID."""
    from mailgw.intake.pipe import message_id_of
    from mailgw.mail.parse import parse_message
    from mailgw.store.db import read_session
    from mailgw.threader import ThreadIndex, held_back, prefetch

    h = Harness(home)
    if h.engine.dialect.name != "sqlite":
        h.close()
        pytest.skip("SQLite's planner and its sqlite_stat1")
    with h.engine.begin() as c:
        c.exec_driver_sql("ANALYZE")
        c.exec_driver_sql("DELETE FROM sqlite_stat1 WHERE tbl = 'inbound'")
        c.exec_driver_sql("INSERT INTO sqlite_stat1 VALUES ('inbound', 'ix_inbound_state', "
                          "'1000000 1000000'), ('inbound', 'ix_inbound_sha256', '1000000 1'), "
                          "('inbound', 'ix_inbound_message_id', '1000000 1')")
    h.engine.dispose()  # new connections read the statistics
    raw = mail("Re: x", msgid="r@customer.test", In_Reply_To="<o@customer.test>")
    assert message_id_of(raw) == "r@customer.test"
    reply = parse_message(raw)
    seen: list[tuple[str, object]] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        seen.append((statement, parameters))

    event.listen(h.engine, "before_cursor_execute", record)
    try:
        with read_session(h.engine) as s:
            index = prefetch(s, [reply], h.settings.ticket_numbers, lock=False, in_flight=[1])
            held, _ = held_back(index, [(1, None, datetime.now(UTC), reply)],
                                datetime.now(UTC), timedelta(seconds=2))
    finally:
        event.remove(h.engine, "before_cursor_execute", record)
    assert isinstance(index, ThreadIndex) and set(held) == {1}  # an orphan, young: held
    looks = [(st, p) for st, p in seen if "FROM inbound" in st]
    assert len(looks) == 1
    with h.engine.connect() as conn:
        for statement, params in looks:
            assert _full_scans(conn, statement, params, set()) == [], statement
            plan = " ".join(r[-1] for r in conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + statement, params))
            assert "ix_inbound_message_id" in plan, plan
    h.close()
