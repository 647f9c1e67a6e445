"""Per-batch writes of the worker's transaction (issue 8: the worker's CPU per message).

The worker stores a batch of messages in one transaction. Written through the ORM's unit of
work message by message, each message cost 4-5 flushes (the ticket and the articles were
flushed one by one to learn their ids) and an INSERT per event, outbox row and counter row.
A ``Batch`` installed on the session (``session.info["batch"]``) changes three things:

* **Ids are taken first.** Every ticket, article, event, outbox and ``auto_replies`` row made
  in the transaction gets its primary key when it is added to the session (ORM objects,
  whichever module adds them) or queued here (rows). On SQLite these are the ids after the
  largest, read once per batch: what SQLite itself gives a row without an id (the tables
  have no AUTOINCREMENT), and safe because the worker holds the one write lock from ``BEGIN
  IMMEDIATE`` to its commit. On PostgreSQL they come from the column's sequence, as a plain
  INSERT would take them. Ids therefore follow the order in which rows are made, whether a
  row goes through the ORM or through the batch's lists, so the event log reads in order.
  No flush is needed to learn an id; the ORM objects are flushed together when a query
  needs them (autoflush: the next message's threading look-up sees this message's
  articles) or at the end.
* **Rows nobody reads back in the transaction are inserted at the end**, one executemany per
  table: the worker's events, the outbox rows and the loop-protection rows.
* **Loop-protection counts are kept in memory** (``LoopCounts``): the store's count of each
  recipient (one query for the batch) and ticket (a new ticket has none) before the batch,
  plus what this batch queued.

A message stored in a SAVEPOINT that is rolled back takes its queued rows and counts with it
(``mark``/``rollback``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta
from functools import cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import ARRAY, String, any_, bindparam, event, func, insert, inspect, select
from sqlalchemy.orm import ORMExecuteState, Session, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value

from mailgw.store import models as m

if TYPE_CHECKING:
    from mailgw.settings import TicketNumbers
    from mailgw.threader import ThreadIndex
    from mailgw.types import ParsedMail

__all__ = ["Batch", "LoopCounts", "batch_of"]

# The tables whose ids a batch hands out, and how many to take from a PostgreSQL sequence at
# a time (a ticket's id is its number: one at a time, so numbers have no gaps from batches).
_BLOCK = {"tickets": 1, "articles": 16, "events": 32, "outbox": 16, "auto_replies": 16}
# PostgreSQL: ids taken for a batch of n messages before its first (one statement for every
# table; ids of rows that are not made are left unused, as a rolled-back INSERT leaves them).
_PER_MESSAGE = {"articles": 2, "events": 3, "outbox": 1, "auto_replies": 1}
_MODELS = {m.Ticket: "tickets", m.Article: "articles", m.Event: "events", m.Outbox: "outbox",
           m.AutoReply: "auto_replies"}


def _numbers(mail: ParsedMail, cfg: TicketNumbers) -> list[str]:
    from mailgw.numbers import subject_pattern

    return [m.group(1) for m in subject_pattern(cfg).finditer(mail.subject or "")]


@cache
def _ticket_columns() -> list[tuple[str, Any, bool]]:
    """(key, default, default is a callable) of every column of tickets."""
    return [(col.key, None if col.default is None else col.default.arg,
             col.default is not None and col.default.is_callable)
            for col in m.Ticket.__table__.columns]


def in_list(column: Any, name: str, pg: bool) -> Any:
    """``column IN (:name)`` for a list given at execution. SQLite: an expanding parameter (the
    list's values inlined as parameters). PostgreSQL: ``column = ANY(:name)``, one array
    parameter: one statement text whatever the list's length, so psycopg prepares it
    (an ``IN`` list was a new text per length, parsed and planned every time:
    bench/RESULTS.md, issue 8 session 7)."""
    if pg:
        # A string array without the column's length: a cast to varchar(n)[] would cut a
        # longer value, which could then equal a stored one (IN compared it whole).
        kind = String() if isinstance(column.type, String) else column.type
        return column == any_(bindparam(name, type_=ARRAY(kind)))
    return column.in_(bindparam(name, expanding=True))


def is_pg(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


@cache
def _statements(pg: bool) -> dict[str, Any]:
    """The batch's statements, built once: building one and its cache key cost more than
    running it (~0.1 ms each, several a batch: bench/RESULTS.md, issue 8 session 7). The
    lists are ``in_list``s."""
    a, h = m.AutoReply.__table__, m.AddressHold.__table__
    tables = [model.__table__ for model in _MODELS]
    return {
        "tops": select(*(select(func.max(t.c.id)).scalar_subquery() for t in tables)),
        "rcpt_counts": select(a.c.recipient, func.count()).where(
            in_list(a.c.recipient, "keys", pg),
            a.c.created_at >= bindparam("since", type_=a.c.created_at.type))
        .group_by(a.c.recipient),
        "holds": select(h.c.address, h.c.until, h.c.reason).where(
            in_list(h.c.address, "keys", pg),
            h.c.until > bindparam("at", type_=h.c.until.type)),
        "ticket_counts": select(a.c.ticket_id, func.count()).where(
            in_list(a.c.ticket_id, "keys", pg),
            a.c.created_at >= bindparam("since", type_=a.c.created_at.type))
        .group_by(a.c.ticket_id),
        **{f"insert {t.name}": insert(t)
           for t in (m.Ticket.__table__, m.Article.__table__, m.Attachment.__table__,
                     m.Event.__table__, m.Outbox.__table__, m.AutoReply.__table__)},
    }


# PostgreSQL: ids from the tables' sequences, one statement whatever the tables and counts
# (one text: psycopg prepares it). The sequences are named, not looked up per id: with
# ``nextval(pg_get_serial_sequence(...))`` PostgreSQL looked the sequence up for every id
# (a batch of 169 ids: 462 us of server CPU; named, 112: bench/RESULTS.md, issue 8 session 7).
_RESERVE = ("SELECT u.i, nextval(u.s) FROM unnest(%(seqs)s::regclass[], %(counts)s::int[]) "
            "WITH ORDINALITY AS u(s, n, i), generate_series(1, u.n)")
_SEQUENCES = "mailgw.batch sequences"


def _sequences(conn: Any) -> dict[str, str]:
    """The id sequence of each table a batch takes ids from, schema-qualified, looked up once
    per database connection (its search path is the engine's)."""
    info = conn.info
    seqs = info.get(_SEQUENCES)
    if seqs is None:
        names = list(_BLOCK)
        row = conn.exec_driver_sql("SELECT " + ", ".join(
            f"pg_get_serial_sequence('{t}', 'id')" for t in names)).one()
        seqs = dict(zip(names, row, strict=True))
        missing = [t for t, seq in seqs.items() if seq is None]
        if missing:  # not kept: nextval(NULL) would hand out NULL ids
            raise RuntimeError(f"no id sequence found for table(s) {', '.join(missing)}")
        info[_SEQUENCES] = seqs
    return seqs


# PostgreSQL: the batch's rows of a table in one statement, a column an array, instead of
# an executemany (psycopg sends a Bind/Execute per row): bench/RESULTS.md, issue 8 session 7,
# second round. Tables whose rows are small; attachments keep the executemany (bytea[]).
UNNEST_TABLES = {"events", "articles", "outbox", "auto_replies", "tickets"}


@cache
def _unnest_plan(table_name: str, keys: tuple[str, ...]) -> tuple[Any, ...] | None:
    """``INSERT INTO t (keys and defaulted columns) SELECT * FROM unnest(arrays)`` and, per
    column, how to make its array: (key, JSON column's none_as_null or None for other types,
    the scalar default of a column the rows leave out or ``_GIVEN``). None: a column the rows
    leave out has a callable default (the executemany computes it)."""
    from sqlalchemy import JSON, DateTime
    from sqlalchemy.dialects import postgresql

    table = m.Base.metadata.tables[table_name]
    dialect = postgresql.dialect()
    cols, casts, plan, times = [], [], [], []
    for col in table.columns:
        if col.key in keys:
            default = _GIVEN
        elif col.default is None:
            continue  # left out: NULL or the server's default, as the executemany leaves it
        elif col.default.is_callable or not col.default.is_scalar:
            return None
        else:
            default = col.default.arg
        json = isinstance(col.type, JSON)
        cols.append(dialect.identifier_preparer.quote(col.name))
        # Binary arrays: a text array escapes and parses every element (the client's CPU for
        # these INSERTs went up, not down).
        # Strings cast without their length (as SQLAlchemy casts a single value): the INSERT
        # checks it (an explicit cast to varchar(n) would cut a longer value silently).
        sqltype = "VARCHAR" if isinstance(col.type, String) else col.type.compile(dialect=dialect)
        casts.append(f"%({col.key})b::{sqltype}[]")
        plan.append((col.key, col.type.none_as_null if json else None, default))
        times.append(isinstance(col.type, DateTime) and default is _GIVEN)
    sql = (f"INSERT INTO {table_name} ({', '.join(cols)}) "
           f"SELECT * FROM unnest({', '.join(casts)})")
    return sql, plan, [key for (key, _, _), time in zip(plan, times, strict=True) if time]


_GIVEN = object()


def insert_rows(conn: Any, table: str, rows: list[dict[str, Any]], pg: bool) -> None:
    """Insert ``rows`` (dicts with the same keys, as an executemany takes them) into
    ``table``: on PostgreSQL as one ``INSERT ... SELECT * FROM unnest(...)``."""
    plan = None
    if pg and len(rows) > 1 and table in UNNEST_TABLES:
        keys = tuple(rows[0])
        if all(len(row) == len(keys) for row in rows):
            plan = _unnest_plan(table, keys)
    if plan is None:
        conn.execute(_statements(pg)[f"insert {table}"], rows)
        return
    sql, columns, times = plan
    from psycopg.types.json import Json  # what SQLAlchemy's psycopg dialect sends a JSON as
    params: dict[str, list[Any]] = {}
    n = len(rows)
    try:
        for key, none_as_null, default in columns:
            if default is not _GIVEN:
                params[key] = [default] * n
            elif none_as_null is None:
                params[key] = values = [row[key] for row in rows]
                # psycopg types a binary array by its elements: one column mixing Python
                # types (1 and "2", True and 0) goes in as before (review, session 7).
                if len({type(v) for v in values if v is not None}) > 1:
                    raise KeyError(key)
            else:  # JSON, as SQLAlchemy's type sends it: None is JSON null unless none_as_null
                params[key] = [None if (v := row[key]) is None and none_as_null else Json(v)
                               for row in rows]
        # A binary array's datetimes must be all naive or all aware (psycopg's text array
        # loses the offsets of a list that mixes them): such rows go in as before.
        for key in times:
            if len({v.tzinfo is None for v in params[key] if v is not None}) > 1:
                raise KeyError(key)
    except KeyError:  # rows with other keys (the executemany's own error, if any), or mixed
        # times or types
        conn.execute(_statements(pg)[f"insert {table}"], rows)
        return
    conn.exec_driver_sql(sql, params)


def batch_of(session: Session) -> Batch | None:
    return session.info.get("batch")


class LoopCounts:
    """Automatic mails in the loop-protection window per recipient and per ticket: the
    store's count before this batch (asked once per key, without flushing) plus this batch's
    own, which reach the store only at its end."""

    def __init__(self, window_hours: float, at: datetime, new_tickets: set[int]):
        self.window_hours = window_hours
        self.since = at - timedelta(hours=window_hours)
        self._stored_rcpt: dict[str, int] = {}
        self._holds: dict[str, tuple[datetime, str] | None] = {}  # address -> (until, reason)
        self._at = at
        self._stored_ticket: dict[int, int] = {}
        self._new_tickets = new_tickets
        self.rcpt: Counter[str] = Counter()
        self.ticket: Counter[int] = Counter()

    def prefetch(self, session: Session, recipients: set[str]) -> None:
        """The stored counts of the batch's likely recipients, in one query."""
        todo = sorted(r for r in recipients if r and r not in self._stored_rcpt)
        if not todo:
            return
        for r in todo:
            self._stored_rcpt[r] = 0
        q = _statements(is_pg(session))
        for rcpt, n in session.connection().execute(q["rcpt_counts"],
                                                    {"keys": todo, "since": self.since}):
            self._stored_rcpt[rcpt] = n
        for r in todo:
            self._holds.setdefault(r, None)
        for address, until, reason in session.connection().execute(
                q["holds"], {"keys": todo, "at": self._at}):
            self._holds[address] = (until, reason)

    def held(self, address: str, until: datetime, reason: str) -> None:
        """A hold made in this batch (a bounce earlier in it): later messages see it."""
        self._holds[address] = (until, reason)

    def hold_for(self, session: Session, recipient: str) -> tuple[datetime, str] | None:
        """The hold on automatic mail to ``recipient`` (mailgw.loops), from the batch's one
        query or, for an address it did not foresee, one look-up by key."""
        if recipient not in self._holds:
            h = m.AddressHold.__table__
            found = session.connection().execute(
                select(h.c.until, h.c.reason).where(h.c.address == recipient,
                                                   h.c.until > self._at)).first()
            self._holds[recipient] = (found[0], found[1]) if found else None
        return self._holds[recipient]

    def for_recipient(self, session: Session, recipient: str) -> int:
        stored = self._stored_rcpt.get(recipient)
        if stored is None:
            t = m.AutoReply.__table__
            stored = self._stored_rcpt[recipient] = session.connection().scalar(
                select(func.count()).select_from(t).where(
                    t.c.recipient == recipient, t.c.created_at >= self.since)) or 0
        return stored + self.rcpt[recipient]

    def prefetch_tickets(self, session: Session, ticket_ids: Iterable[int]) -> None:
        """The stored counts of the batch's known stored tickets, in one query."""
        todo = sorted(t for t in ticket_ids
                      if t not in self._stored_ticket and t not in self._new_tickets)
        if not todo:
            return
        for t in todo:
            self._stored_ticket[t] = 0
        for tid, n in session.connection().execute(_statements(is_pg(session))["ticket_counts"],
                                                   {"keys": todo, "since": self.since}):
            self._stored_ticket[tid] = n

    def for_ticket(self, session: Session, ticket_id: int) -> int:
        stored = self._stored_ticket.get(ticket_id)
        if stored is None:
            if ticket_id in self._new_tickets:
                stored = 0  # made in this batch: nothing in the store names it yet
            else:
                t = m.AutoReply.__table__
                stored = session.connection().scalar(
                    select(func.count()).select_from(t).where(
                        t.c.ticket_id == ticket_id, t.c.created_at >= self.since)) or 0
            self._stored_ticket[ticket_id] = stored
        return stored + self.ticket[ticket_id]

    def add(self, recipient: str, ticket_id: int | None) -> None:
        self.rcpt[recipient] += 1
        if ticket_id is not None:
            self.ticket[ticket_id] += 1


class Batch:
    def __init__(self, session: Session, *, loop_window_hours: float, at: datetime):
        self.pg = session.get_bind().dialect.name == "postgresql"
        self.at = at
        self._next: dict[str, int] = {}
        self._pool: dict[str, list[int]] = {name: [] for name in _BLOCK}
        self.new_tickets: set[int] = set()
        # ORM objects added in the batch (flushed or not): what a look-up that does not
        # flush must add to what the store holds (mailgw/process.py, threading).
        self.articles: list[m.Article] = []
        self.message_ids: set[str] = set()
        self.own_message_ids: dict[str, m.Article] = {}  # the newest of the batch's articles
        self.tickets: list[m.Ticket] = []
        self.added_tickets: list[m.Ticket] = []  # new tickets made by add_ticket
        self.unwritten_tickets: list[m.Ticket] = []  # ... whose row is not inserted yet
        self.new_numbers: dict[str, m.Ticket] = {}  # their numbers
        # What threading asks the store, asked once for the batch (prefetch); None: ask the
        # store per message, as outside the worker.
        self.threads: ThreadIndex | None = None
        self.events: list[dict[str, Any]] = []
        self.out_articles: list[dict[str, Any]] = []  # our acknowledgements: rows, not objects
        self._moved: list[tuple[dict[str, Any], int]] = []  # (row, its ticket before a merge)
        self.attachments: list[dict[str, Any]] = []
        self.attachment_bytes = 0
        self.outbox: list[dict[str, Any]] = []
        self.auto_replies: list[dict[str, Any]] = []
        self.loops = LoopCounts(loop_window_hours, at, self.new_tickets)
        # What mailgw.process.prepare computed for the batch's messages before the write
        # transaction, by inbound id (the worker's parse step).
        self.prepared: dict[int, Any] = {}
        # Messages held back for an original still in the queue (inbound id -> delay before
        # they are claimed again), and why those held too long were not (mailgw.threader
        # held_back); set by prefetch.
        self.held: dict[int, timedelta] = {}
        self.hold_notes: dict[int, str] = {}
        if not self.pg:
            tables = [model.__table__ for model in _MODELS]
            tops = session.connection().execute(_statements(False)["tops"]).one()
            for t, top in zip(tables, tops, strict=True):
                self._next[t.name] = (top or 0) + 1
        session.info["batch"] = self

    def prefetch(self, session: Session, mails: Iterable[ParsedMail | Exception | None],
                 numbers: TicketNumbers, rows: list[m.Inbound] | None = None,
                 orphan_wait: timedelta = timedelta(0)) -> None:
        """Before the batch's first message: what threading its messages will ask, in a few
        queries for the whole batch (``mailgw.threader.prefetch``; on PostgreSQL the tickets
        they lead to are locked in id order), and those tickets' loop-protection counts.
        ``rows`` (the worker; ``mails`` are theirs, in order): which of them to hold back for
        an original still in the queue (``held``, ``hold_notes``; mailgw.threader.held_back)."""
        from mailgw.threader import held_back, message_refs, prefetch
        from mailgw.types import ParsedMail

        mails = list(mails)
        parsed = [p for p in mails if isinstance(p, ParsedMail)]
        self.threads = index = prefetch(session, parsed, numbers, lock=self.pg,
                                        in_flight=None if rows is None else [r.id for r in rows])
        if rows is not None:
            self.held, self.hold_notes = held_back(index, [
                (row.id, row.held_since, row.received_at,
                 mail if isinstance(mail, ParsedMail) else None)
                for row, mail in zip(rows, mails, strict=True)], self.at, orphan_wait)
            if self.held:
                parsed = [mail for row, mail in zip(rows, mails, strict=True)
                          if isinstance(mail, ParsedMail) and row.id not in self.held]
        self.loops.prefetch_tickets(session, index.tickets)
        if not self.pg or not parsed:
            return
        # The ids the batch will likely use, in one round trip. Tickets: one per message that
        # refers to no stored article, no other message of the batch (the worker stores a
        # batch's originals before their replies) and no stored ticket number (a ticket id
        # is its number: a message that then makes no ticket, such as a bounce or an agent's
        # answer, leaves a number unused).
        new = 0
        seen = {mail.message_id for mail in parsed if mail.message_id}
        for mail in parsed:
            refs = message_refs(mail)
            if not any(r in index.refs or (r in seen and r != mail.message_id)
                       for r in refs) and not any(
                    index.numbers.get(n) is not None for n in _numbers(mail, numbers)):
                new += 1
        self.reserve(session, {"tickets": new, **{t: k * len(parsed)
                                                  for t, k in _PER_MESSAGE.items()}})

    def reserve(self, session: Session, counts: dict[str, int]) -> None:
        """PostgreSQL: take ``counts`` ids of each table from its sequence, in one statement;
        they are handed out (``take``) after those already taken."""
        names = [t for t, n in counts.items() if n > 0]
        if not names:
            return
        conn = session.connection()
        seqs = _sequences(conn)
        got: dict[int, list[int]] = {}
        for i, value in conn.exec_driver_sql(
                _RESERVE, {"seqs": [seqs[t] for t in names],
                           "counts": [int(counts[t]) for t in names]}):
            got.setdefault(i, []).append(value)
        for i, t in enumerate(names, 1):
            self._pool[t][:0] = sorted(got.get(i, ()), reverse=True)  # after the pool's own

    def close(self, session: Session) -> None:
        session.info.pop("batch", None)

    def take(self, session: Session, table: str) -> int:
        """The next id of ``table`` for a row of this transaction."""
        if not self.pg:
            n = self._next[table]
            self._next[table] = n + 1
            return n
        pool = self._pool[table]
        if not pool:
            self.reserve(session, {table: _BLOCK[table]})
        return pool.pop()

    def add_ticket(self, session: Session, ticket: m.Ticket) -> None:
        """Put a new ticket in the session as if it had been loaded, and insert its row before
        the session's next flush (``write_tickets``), the batch's new tickets in one
        statement: the ORM is not told that articles name it (no relationship) and could
        flush an article before its ticket, and a statement per ticket cost more than the
        rest of its rows."""
        if ticket.id is None:
            ticket.id = self.take(session, "tickets")
        self.new_tickets.add(ticket.id)
        # Every column set (in the instance's dict: make_transient_to_detached takes what is
        # there as loaded): one left out would be expired and loaded again on access.
        values = ticket.__dict__
        for key, default, call in _ticket_columns():
            if values.get(key) is None:
                values[key] = default(None) if call else default
        make_transient_to_detached(ticket)
        session.add(ticket)
        self.added_tickets.append(ticket)
        self.unwritten_tickets.append(ticket)
        if ticket.number:
            self.new_numbers[ticket.number] = ticket

    def write_tickets(self, session: Session) -> None:
        """Insert the new tickets not inserted yet, as they are now, and make what they are
        now their stored state (no UPDATE follows for what changed since add_ticket)."""
        tickets, self.unwritten_tickets = self.unwritten_tickets, []
        if not tickets:
            return
        columns = [col.key for col in m.Ticket.__table__.columns]
        rows = []
        for ticket in tickets:
            values = ticket.__dict__
            rows.append({key: values[key] for key in columns})
            state = inspect(ticket)
            for key in list(state.committed_state):
                set_committed_value(ticket, key, values[key])
        insert_rows(session.connection(), "tickets", rows, self.pg)

    # Rows written at the end of the batch -------------------------------------------------

    def event(self, session: Session, **row: Any) -> None:
        row["id"] = self.take(session, "events")
        self.events.append(row)

    def outbox_row(self, session: Session, **row: Any) -> None:
        row["id"] = self.take(session, "outbox")
        self.outbox.append(row)

    def out_article(self, session: Session, **row: Any) -> int:
        """An article of ours (an acknowledgement) as a row: nothing in the transaction reads
        it back as an object. Returns its id."""
        row["id"] = self.take(session, "articles")
        self.out_articles.append(row)
        return row["id"]

    def attachment(self, session: Session, row: dict[str, Any], limit: int) -> bool:
        """Queue an attachment row for the end of the batch while the batch's queued
        attachments stay under ``limit`` bytes; False: insert it now."""
        size = len(row["data"])
        if self.attachment_bytes + size > limit:
            return False
        self.attachment_bytes += size
        self.attachments.append(row)
        return True

    def auto_reply(self, session: Session, recipient: str, ticket_id: int | None,
                   at: datetime) -> None:
        self.auto_replies.append({"id": self.take(session, "auto_replies"),
                                  "recipient": recipient[:320], "ticket_id": ticket_id,
                                  "created_at": at})
        self.loops.add(recipient, ticket_id)

    def move_articles(self, from_ticket: int, to_ticket: int) -> int:
        """A merge (an agent's ``#merge``) moves the articles of ``from_ticket``: those this
        batch has queued as rows and not written yet move too (the UPDATE of the stored
        ones cannot see them). Undone if the message's SAVEPOINT is rolled back."""
        moved = 0
        for row in self.out_articles:
            if row["ticket_id"] == from_ticket:
                self._moved.append((row, from_ticket))
                row["ticket_id"] = to_ticket
                moved += 1
        return moved

    def mark(self) -> tuple[Any, ...]:
        return (len(self.events), len(self.outbox), len(self.auto_replies),
                Counter(self.loops.rcpt), Counter(self.loops.ticket), len(self.articles),
                len(self.tickets), len(self.out_articles), len(self.attachments),
                self.attachment_bytes, len(self.added_tickets), len(self.unwritten_tickets),
                len(self._moved))

    def rollback(self, mark: tuple[Any, ...]) -> None:
        """Forget what was queued since ``mark`` (its SAVEPOINT was rolled back)."""
        (ne, no, na, rcpt, ticket, nart, ntick, nout, natt, self.attachment_bytes,
         nadded, nunwritten, nmoved) = mark
        for row, before in reversed(self._moved[nmoved:]):
            row["ticket_id"] = before
        del self._moved[nmoved:]
        del self.events[ne:], self.outbox[no:], self.auto_replies[na:]
        del self.out_articles[nout:], self.attachments[natt:]
        self.loops.rcpt, self.loops.ticket = rcpt, ticket
        del self.articles[nart:], self.tickets[ntick:], self.added_tickets[nadded:]
        # A ticket inserted in the SAVEPOINT is gone with it; one not inserted yet never will be.
        del self.unwritten_tickets[min(nunwritten, len(self.unwritten_tickets)):]
        self.message_ids = {a.message_id for a in self.articles if a.message_id}
        self.own_message_ids = {a.message_id: a for a in self.articles if a.message_id}
        self.new_numbers = {t.number: t for t in self.added_tickets if t.number}

    def first_message_id(self, ticket_id: int) -> tuple[int, str] | None:
        """(id, Message-ID) of the batch's first article of the ticket that has one."""
        first = None
        for a in self.articles:  # in id order: ids are taken when added
            if a.ticket_id == ticket_id and a.message_id is not None:
                first = (a.id, a.message_id)
                break
        for row in self.out_articles:
            if row["ticket_id"] == ticket_id and row["message_id"] is not None:
                if first is None or row["id"] < first[0]:
                    first = (row["id"], row["message_id"])
                break
        return first

    def write(self, session: Session) -> None:
        """Flush the ORM objects, then insert the queued rows: one statement per table."""
        session.flush()
        conn = session.connection()
        for table, rows in (("articles", self.out_articles), ("attachments", self.attachments),
                            ("events", self.events), ("outbox", self.outbox),
                            ("auto_replies", self.auto_replies)):
            if rows:
                insert_rows(conn, table, rows, self.pg)
                rows.clear()
        self.attachment_bytes = 0
        self._moved.clear()


@event.listens_for(Session, "transient_to_pending")
def _take_id(session: Session, obj: Any) -> None:
    batch = session.info.get("batch")
    if batch is None:
        return
    table = _MODELS.get(type(obj))
    if table is None:
        return
    if obj.id is None:
        obj.id = batch.take(session, table)
        if table == "tickets":
            batch.new_tickets.add(obj.id)
    if table == "articles":
        batch.articles.append(obj)
        if obj.message_id:
            batch.message_ids.add(obj.message_id)
            batch.own_message_ids[obj.message_id] = obj
    elif table == "tickets":
        batch.tickets.append(obj)


@event.listens_for(Session, "before_flush")
def _write_tickets(session: Session, flush_context: Any, instances: Any) -> None:
    """The batch's new tickets go in before anything the flush writes names them."""
    batch = session.info.get("batch")
    if batch is not None and batch.unwritten_tickets:
        batch.write_tickets(session)


@event.listens_for(Session, "do_orm_execute")
def _drop_thread_index(state: ORMExecuteState) -> None:
    """An UPDATE or DELETE of articles or tickets in the batch (an agent's #merge moves a
    ticket's articles) may change what the batch's ``ThreadIndex`` says: threading asks the
    store again from then on."""
    batch = state.session.info.get("batch")
    if batch is None or batch.threads is None or not (state.is_update or state.is_delete):
        return
    table = getattr(state.statement, "table", None)
    if getattr(table, "name", None) in ("articles", "tickets"):
        batch.threads = None
