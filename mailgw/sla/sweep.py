"""The escalation sweep: fire each SLA warning and breach exactly once (docs/sla-escalations.md).

One tick reads only the clocks whose ``next_notice_at`` has come, through the partial index
on it, oldest first, a batch at a time: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so
sweepers on several nodes share the due clocks instead of waiting for each other; SQLite's
``BEGIN IMMEDIATE`` (mailgw/store/db.py) makes a sweep the one writer. Per clock, in the
batch's one transaction: re-check that it runs and really reached its level (else clear or
correct ``next_notice_at``), set ``breached_at`` once the goal has passed, defer to the SLA
calendar's working hours if asked, insert the ``sla_notices`` row for (clock, level) — its
unique index is what makes a notice exactly-once across sweepers, crashes and restarts —,
advance ``next_level`` and schedule the next one, apply the level's actions and queue the
notice mail. A crash before the commit leaves everything as it was.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from jinja2 import TemplateError
from sqlalchemy import Engine, Select, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from mailgw import ticket_events
from mailgw.assign import choose_owner
from mailgw.calendar import Calendar
from mailgw.outbound.render import Renderer
from mailgw.queue import now as utcnow
from mailgw.settings import Settings, Sla, SlaActions, SlaLevel
from mailgw.sla.clocks import calendar_for, schedule
from mailgw.sla.notices import Prepared, number, prepare, recipients, store, template_for
from mailgw.sla.select import sla_by_name
from mailgw.store import models as m
from mailgw.types import aware

log = logging.getLogger(__name__)

# A notice whose template fails is tried again this much later (after the admin's fix).
RETRY_FAILED = timedelta(minutes=5)
# Batches per sweep at most: a sweep ends when nothing is due, this only bounds a bug.
_MAX_BATCHES = 10_000
# Batches rolled back for a guard row found only at the INSERT, before a sweep gives up (the
# next sweep tries again): a guard row that the claim cannot see would otherwise spin.
_MAX_RACED = 3
_GUARD_INDEX = "uq_sla_notices_clock_level"  # the unique (clock_id, level) index


@dataclass
class Fired:
    """One notice the sweep sent (or, with no recipient, recorded)."""

    clock_id: int
    ticket_id: int
    ticket: str | None
    sla: str
    target: str
    level: int  # index into the SLA's levels
    percent: int
    kind: str  # warning / breach
    reached_at: str
    recipients: list[str]
    changes: dict[str, list[Any]]


@dataclass
class SweepResult:
    fired: list[Fired] = field(default_factory=list)
    deferred: list[dict[str, Any]] = field(default_factory=list)  # clock, level, until
    skipped: list[dict[str, Any]] = field(default_factory=list)  # clock, why
    batches: int = 0
    raced: int = 0  # batches rolled back because another transaction notified first

    def as_json(self) -> dict[str, Any]:
        return {"fired": [asdict(f) for f in self.fired], "deferred": self.deferred,
                "skipped": self.skipped, "batches": self.batches}


def _reached_at(clock: m.SlaClock, percent: int, cal: Calendar) -> datetime:
    """When a running clock reaches ``percent`` of its goal: the counted time before this
    running segment, then working time of the calendar from ``running_since``."""
    need = percent / 100 * clock.goal_minutes * 60 - clock.used_seconds
    since = aware(clock.running_since)
    assert since is not None
    return since if need <= 0 else cal.add(since, need)


def _schedule(clock: m.SlaClock, sla: Sla, cal: Calendar) -> None:
    """Set ``next_notice_at`` from ``next_level`` (sla-core's rule, mailgw/sla/clocks.py)."""
    schedule(clock, sla, cal)


class _Raced(Exception):
    """A guard row this batch meant to insert was there at the INSERT (another transaction
    committed it after the claim looked): the batch is rolled back and claimed again."""


def _insert_notices(session: Session, rows: list[dict[str, Any]]) -> None:
    """INSERT the batch's (clock, level) guard rows, with what each notice did (one
    executemany). The unique index decides: when a row is there already (on PostgreSQL:
    once the transaction that inserted it has committed), ``_Raced`` rolls the whole batch
    back, its mails and actions with it."""
    if not rows:
        return
    if session.get_bind().dialect.name == "postgresql":
        # A plain INSERT: the unique index refuses a row that is there, which aborts the
        # transaction (rolled back anyway); ``_writes`` turns that into ``_Raced``.
        # psycopg's pipelined executemany gives no row count, and RETURNING makes
        # SQLAlchemy send one statement with all the rows' values: for 300 notices about
        # twice the client CPU and three times the wall time.
        session.execute(insert(m.SlaNotice.__table__).inline(), rows)
        return
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    # sqlite3's executemany sums the rows each execution inserted and a skipped conflict
    # counts none (cheaper than RETURNING through SQLAlchemy, measured)
    stmt = sqlite_insert(m.SlaNotice.__table__).on_conflict_do_nothing(
        index_elements=["clock_id", "level"])
    inserted = session.execute(stmt, rows).rowcount
    if inserted != len(rows):
        raise _Raced(f"{len(rows) - inserted} of {len(rows)} notices were sent by another "
                     "transaction")


_ADVANCED = ("next_level", "next_notice_at", "breached_at")


def _advance(session: Session, clocks: list[m.SlaClock]) -> None:
    """UPDATE the fired clocks' level, next notice and breach (one Core executemany,
    without the ORM flush's per-object bookkeeping and row-count check: the rows are the
    claimed ones, locked or under SQLite's write lock), then tell the ORM these values are
    stored, so its flush at the commit leaves them out (it still writes anything else that
    changed)."""
    if not clocks:
        return
    t = m.SlaClock.__table__
    stmt = (update(t).where(t.c.id == bindparam("clock_id"))
            .values({c: bindparam(f"new_{c}") for c in _ADVANCED}))
    session.execute(stmt, [{"clock_id": c.id, **{f"new_{a}": getattr(c, a) for a in _ADVANCED}}
                           for c in clocks])
    for c in clocks:
        for a in _ADVANCED:
            set_committed_value(c, a, getattr(c, a))


@contextmanager
def _writes(session: Session) -> Iterator[None]:
    """Around the batch's INSERTs: on PostgreSQL a unique violation of the guard index is
    ``_Raced``. (Not in one psycopg pipeline: tried, and at 1,000,000 tickets some
    processes then stalled 100 ms in each batch's writes, bench/RESULTS.md.)"""
    try:
        yield
    except IntegrityError as exc:
        diag = getattr(exc.orig, "diag", None)
        if getattr(diag, "constraint_name", None) == _GUARD_INDEX:
            raise _Raced(f"{diag.message_detail} (sent by another transaction)") from exc
        raise


def apply_actions(session: Session, settings: Settings, ticket: m.Ticket, actions: SlaActions,
                  at: datetime) -> tuple[dict[str, list[Any]], list[str]]:
    """Do a level's actions to the ticket (no commit). Returns the changes as
    ``{column: [old, new]}`` and notes on what was not done and why."""
    changes: dict[str, list[Any]] = {}
    notes: list[str] = []
    if actions.priority is not None:
        new = max(1, ticket.priority - 1) if actions.priority == "raise" else actions.priority
        if new != ticket.priority:
            changes["priority"] = [ticket.priority, new]
            ticket.priority = new
        else:
            notes.append(f"priority already {new}")
    if actions.assign is not None:
        owner: str | None = None
        if actions.assign == "queue":
            queue = settings.queue(ticket.queue)
            if queue is None:
                notes.append(f"assign: queue {ticket.queue!r} is not configured")
            else:
                result = choose_owner(session, settings, queue, tags=list(ticket.tags or []),
                                      customer=ticket.customer, at=at, exclude_ticket=ticket.id)
                owner = result.owner
                notes.append(f"assign: {result.reason}")
        elif settings.agent(actions.assign) is None:
            notes.append(f"assign: {actions.assign!r} is not a configured agent")
        else:
            owner = actions.assign
        if owner is not None and owner != ticket.owner:
            changes["owner"] = [ticket.owner, owner]
            ticket.owner = owner
    if actions.tags:
        old = list(ticket.tags or [])
        new_tags = old + [t for t in dict.fromkeys(actions.tags) if t not in old]
        if new_tags != old:
            changes["tags"] = [old, new_tags]
            ticket.tags = new_tags  # a new list: the JSON column sees the change
    if changes:
        ticket.updated_at = at
    return changes, notes


def claim_query(at: datetime, batch_size: int, pg: bool) -> Select[Any]:
    """A batch in one statement: the due clocks (oldest first; on PostgreSQL locked,
    skipping those another sweeper holds), each with its ticket, whether the guard row of
    its next level exists already (normally not: notified before, though the clock had not
    moved on) and the Message-ID of the ticket's first message (a notice replies to it, so
    agents' clients file it in the ticket's thread)."""
    c, t, a, n = m.SlaClock, m.Ticket, m.Article, m.SlaNotice
    notified = select(n.id).where(n.clock_id == c.id, n.level == c.next_level).exists()
    root = (select(a.message_id).where(a.ticket_id == c.ticket_id, a.message_id.is_not(None))
            .order_by(a.id).limit(1).scalar_subquery())
    q = (select(c, t, notified, root).outerjoin(t, t.id == c.ticket_id)
         .where(c.next_notice_at.is_not(None), c.next_notice_at <= at)
         .order_by(c.next_notice_at).limit(batch_size))
    return q.with_for_update(skip_locked=True, of=c) if pg else q


class Sweeper:
    """Runs ticks; one per scheduler job or ``mailgw sla sweep``. Holds no state between
    ticks besides its configuration: everything that matters is in the database."""

    def __init__(self, engine: Engine, settings: Settings, renderer: Renderer, *,
                 batch_size: int | None = None):
        self.engine = engine
        self.settings = settings
        self.renderer = renderer
        self.batch_size = batch_size or settings.sla_sweep.batch_size
        self.node = f"{socket.gethostname()}:{os.getpid()}"[:200]
        self._pg = engine.dialect.name == "postgresql"

    def sweep(self, at: datetime | None = None) -> SweepResult:
        """Fire everything due at ``at`` (default now), batch after batch, until a batch
        finds nothing. A clock whose next level is also due comes back in a later batch,
        so levels fire in order."""
        result = SweepResult()
        for _ in range(_MAX_BATCHES):
            if not self.tick(at or utcnow(), result) or result.raced > _MAX_RACED:
                break
        return result

    def tick(self, at: datetime, result: SweepResult) -> int:
        """One batch in one transaction; returns how many clocks it claimed.

        In phases, so a batch costs a fixed number of statements rather than several per
        clock: the claim (clocks, tickets, whether each level's guard row exists already —
        those levels are not notified again — and each ticket's first Message-ID, one
        statement); decide per clock (skip, reschedule, defer or fire); the actions and
        rendering; the articles' and outbox rows' ids; one UPDATE of the fired clocks; the
        INSERTs of the articles and outbox rows (100 a statement), guard rows (with what
        each notice did) and events; the ORM's flush of whatever else changed."""
        part = SweepResult()
        try:
            claimed = self._tick(at, part)
        except _Raced as exc:
            # Nothing of this batch was committed; the next batch claims these clocks again
            # and finds the other transaction's guard rows.
            result.raced += 1
            log.warning("SLA sweep batch rolled back and claimed again: %s", exc)
            return 1
        result.fired += part.fired
        result.deferred += part.deferred
        result.skipped += part.skipped
        result.batches += 1 if claimed else 0
        return claimed

    def _claim(self, s: Session, at: datetime) -> list[tuple[m.SlaClock, m.Ticket | None,
                                                            bool, str | None]]:
        return [tuple(r) for r in s.execute(  # type: ignore[misc]
            claim_query(at, self.batch_size, self._pg))]

    def _tick(self, at: datetime, result: SweepResult) -> int:
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            claimed = self._claim(s, at)
            if not claimed:
                return 0
            due: list[_Due] = []
            before: set[tuple[int, int]] = set()
            root: dict[int, str] = {}
            for clock, ticket, notified, first in claimed:
                level = clock.next_level
                d = self._decide(clock, ticket, at, result)
                if d is None:
                    continue
                due.append(d)
                if notified:
                    before.add((clock.id, level))
                if first is not None:
                    root[d.ticket.id] = first
            for d in due:
                # Advance first: whatever the actions make the SLA code do to this clock
                # (ticket_changed) has the last word on it.
                d.clock.next_level = d.index + 1
                _schedule(d.clock, d.sla, d.cal)
                if (d.clock.id, d.index) in before:
                    # The guard row exists: fired before, though the clock had not moved on
                    # (something rewound next_level). Never twice.
                    log.warning("SLA clock %s level %s was notified before; not again",
                                d.clock.id, d.index)
            self._fire(s, [d for d in due if (d.clock.id, d.index) not in before], at, result,
                       root)
        return len(claimed)

    def _decide(self, clock: m.SlaClock, ticket: m.Ticket | None, at: datetime,
                result: SweepResult) -> _Due | None:
        """What to do with one claimed clock: None when it is skipped, rescheduled or
        deferred (done here, on the row); else the level that fires now."""
        sla = sla_by_name(self.settings, clock.sla)

        def skip(why: str) -> None:
            clock.next_notice_at = None
            result.skipped.append({"clock_id": clock.id, "ticket_id": clock.ticket_id,
                                   "why": why})

        if ticket is None:
            return skip("the ticket does not exist")
        if sla is None:
            return skip(f"SLA {clock.sla!r} is not configured (any more)")
        if clock.state != "running" or clock.running_since is None:
            return skip(f"the clock is {clock.state}")
        if clock.next_level >= len(sla.levels):
            return skip("no level left")
        # The clock counts in its own calendar (None: 24x7); notices keep the SLA calendar's
        # working hours.
        cal = calendar_for(self.settings, clock.calendar)
        hours = calendar_for(self.settings, sla.calendar)
        level = sla.levels[clock.next_level]
        reached = _reached_at(clock, level.percent, cal)
        if reached > at:
            # Scheduled too early (the clock changed since): look again when it is reached.
            clock.next_notice_at = reached
            result.skipped.append({"clock_id": clock.id, "ticket_id": clock.ticket_id,
                                   "why": f"level {level.percent}% not reached until "
                                          f"{reached.isoformat()}"})
            return None
        due = _reached_at(clock, 100, cal)
        if clock.breached_at is None and due <= at:
            # The breach happened when the goal was used up, whenever we notice or tell.
            clock.breached_at = due
        if sla.defer_outside_hours and not hours.is_working_time(at):
            until = hours.next_working(at)
            # Wake up at the breach too, if it comes first: breached_at is recorded at its
            # real time even while its notice waits for working hours.
            clock.next_notice_at = until if clock.breached_at is not None else min(until, due)
            result.deferred.append({"clock_id": clock.id, "ticket_id": clock.ticket_id,
                                    "level": clock.next_level, "percent": level.percent,
                                    "until": until.isoformat()})
            return None
        return _Due(clock, ticket, sla, cal, hours, clock.next_level, level, reached, due)

    def _fire(self, s: Session, due: list[_Due], at: datetime, result: SweepResult,
              root: dict[int, str]) -> None:
        """Actions, mails, guard rows and events for the levels that fire; ``root``: the
        first Message-ID of each ticket."""
        mails: list[Prepared] = []
        fired: list[tuple[_Due, dict[str, Any], Prepared | None]] = []
        for d in due:
            kind = d.kind
            changes, notes = apply_actions(s, self.settings, d.ticket, d.level.actions, at)
            done: dict[str, Any] = {"changes": changes, "notes": notes}
            to, missing = recipients(self.settings, d.ticket, d.level)
            mail = None
            if to:
                try:
                    mail = prepare(self.settings, self.renderer, ticket=d.ticket, clock=d.clock,
                                   sla=d.sla, cal=d.hours, level_index=d.index, level=d.level,
                                   to=to, reached_at=d.reached, at=at,
                                   root=root.get(d.ticket.id), actions=done)
                except TemplateError as exc:
                    self._failed(s, d, changes, at, exc, result)
                    continue
                mails.append(mail)
            else:
                s.add(m.Event(type="sla_notice_unaddressed", ticket_id=d.ticket.id,
                              created_at=at, data={
                                  "clock_id": d.clock.id, "sla": d.sla.name,
                                  "target": d.clock.target, "level": d.index,
                                  "percent": d.level.percent, "notify": list(d.level.notify),
                                  "why": missing}))
            done.update(recipients=to, unaddressed=missing, template=template_for(d.level))
            fired.append((d, done, mail))
            if changes:
                ticket_events.ticket_changed(
                    s, self.settings, d.ticket, {k: (v[0], v[1]) for k, v in changes.items()},
                    at=at, reason=f"SLA {d.sla.name} {d.clock.target} {kind} at "
                                  f"{d.level.percent}%")
        number(s, mails)
        with _writes(s):
            _advance(s, [d.clock for d, _, _ in fired])
            store(s, self.settings, mails, at)
            notices, events = [], []
            for d, done, mail in fired:
                done.update(article_id=mail.article_id if mail else None,
                            outbox_id=mail.outbox_id if mail else None)
                notices.append({
                    "clock_id": d.clock.id, "ticket_id": d.clock.ticket_id, "level": d.index,
                    "kind": d.kind, "percent": d.level.percent,
                    "due_at": aware(d.clock.due_at) or d.due, "fired_at": at, "node": self.node,
                    "actions": done})
                events.append({"type": f"sla_{d.kind}", "ticket_id": d.ticket.id,
                               "article_id": done["article_id"], "created_at": at, "data": {
                                   "clock_id": d.clock.id, "sla": d.sla.name,
                                   "target": d.clock.target, "level": d.index,
                                   "percent": d.level.percent, "reached_at": d.reached.isoformat(),
                                   **done}})
                result.fired.append(Fired(
                    d.clock.id, d.ticket.id, d.ticket.number, d.sla.name, d.clock.target, d.index,
                    d.level.percent, d.kind, d.reached.isoformat(), done["recipients"],
                    done["changes"]))
            if fired:
                _insert_notices(s, notices)
                # inline: no RETURNING of the id even for one row (it reads no result)
                s.execute(insert(m.Event.__table__).inline(), events)

    def _failed(self, s: Session, d: _Due, changes: dict[str, list[Any]], at: datetime,
                exc: TemplateError, result: SweepResult) -> None:
        """A notice that does not render (a config mistake) is not sent and not counted:
        it gets no guard row, the ticket keeps its values, the clock stays at this level and
        is tried again in RETRY_FAILED, and the rest of the batch goes on."""
        name = getattr(exc, "name", None) or getattr(exc, "filename", None)
        line = getattr(exc, "lineno", None)
        where = f"templates/{name}" + (f":{line}" if line else "") if name else "templates"
        why = f"{where}: {type(exc).__name__}: {exc.message or exc}"
        log.error("SLA notice for clock %s (ticket %s) not sent, retried in %s: %s",
                  d.clock.id, d.ticket.id, RETRY_FAILED, why)
        for column, (old, _new) in changes.items():
            setattr(d.ticket, column, old)
        d.clock.next_level, d.clock.next_notice_at = d.index, at + RETRY_FAILED
        s.add(m.Event(type="sla_notice_failed", ticket_id=d.ticket.id, created_at=at,
                      data={"clock_id": d.clock.id, "level": d.index, "error": why}))
        result.skipped.append({"clock_id": d.clock.id, "ticket_id": d.ticket.id, "why": why})


@dataclass
class _Due:
    """A claimed clock whose level fires in this batch."""

    clock: m.SlaClock
    ticket: m.Ticket
    sla: Sla
    cal: Calendar  # the clock's arithmetic
    hours: Calendar  # the SLA's working hours (deferral, times in the mail)
    index: int
    level: SlaLevel
    reached: datetime
    due: datetime

    @property
    def kind(self) -> str:
        return "breach" if self.level.percent >= 100 else "warning"


def sweep(engine: Engine, settings: Settings, renderer: Renderer, *,
          at: datetime | None = None, batch_size: int | None = None) -> SweepResult:
    """One sweep now: what the scheduler job and ``mailgw sla sweep`` run."""
    return Sweeper(engine, settings, renderer, batch_size=batch_size).sweep(at)
