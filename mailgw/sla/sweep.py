"""The escalation sweep: fire each SLA warning and breach exactly once (docs/sla-escalations.md).

One tick reads only the clocks whose ``next_notice_at`` has come, through the partial index
on it, oldest first, a batch at a time: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so
sweepers on several nodes share the due clocks instead of waiting for each other; SQLite's
``BEGIN IMMEDIATE`` (mailgw/store/db.py) makes a sweep the one writer. Per clock, in the
batch's one transaction: re-check that it runs and really reached its level (else clear or
correct ``next_notice_at``), insert the ``sla_notices`` row for (clock, level) — its unique
index is what makes a notice exactly-once across sweepers, crashes and restarts —, set
``breached_at``, queue the notice mail, apply the level's actions, advance ``next_level``
and schedule the next one. A crash before the commit leaves everything as it was.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from jinja2 import TemplateError
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from mailgw import ticket_events
from mailgw.assign import choose_owner
from mailgw.calendar import ALWAYS, Calendar
from mailgw.outbound.render import Renderer
from mailgw.queue import now as utcnow
from mailgw.settings import Settings, Sla, SlaActions, per_settings
from mailgw.sla.notices import aware, queue_notice
from mailgw.store import models as m

log = logging.getLogger(__name__)

# A notice whose template fails is tried again this much later (after the admin's fix).
RETRY_FAILED = timedelta(minutes=5)
# Batches per sweep at most: a sweep ends when nothing is due, this only bounds a bug.
_MAX_BATCHES = 10_000


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

    def as_json(self) -> dict[str, Any]:
        return {"fired": [asdict(f) for f in self.fired], "deferred": self.deferred,
                "skipped": self.skipped, "batches": self.batches}


@per_settings
def _calendars(settings: Settings) -> dict[str, Calendar]:
    return {c.name: Calendar(c) for c in settings.calendars}


def _calendar(settings: Settings, name: str | None) -> Calendar:
    # TODO(merge): use sla-core's mailgw.sla.clocks.calendar_for(settings, name).
    return ALWAYS if name is None else _calendars(settings).get(name, ALWAYS)


def _sla(settings: Settings, name: str) -> Sla | None:
    return next((s for s in settings.slas if s.name == name), None)


def _reached_at(clock: m.SlaClock, percent: int, cal: Calendar) -> datetime:
    """When a running clock reaches ``percent`` of its goal: the counted time before this
    running segment, then working time of the calendar from ``running_since``."""
    need = percent / 100 * clock.goal_minutes * 60 - clock.used_seconds
    since = aware(clock.running_since)
    assert since is not None
    return since if need <= 0 else cal.add(since, need)


def _schedule(clock: m.SlaClock, sla: Sla, cal: Calendar) -> None:
    """Set ``next_notice_at`` from ``next_level``: when the next level is reached, or None
    (no level left, or the clock is not running).
    TODO(merge): replace with sla-core's mailgw.sla.clocks.schedule(clock, sla, calendar)."""
    if clock.state != "running" or clock.running_since is None or \
            clock.next_level >= len(sla.levels):
        clock.next_notice_at = None
        return
    clock.next_notice_at = _reached_at(clock, sla.levels[clock.next_level].percent, cal)


def _insert_notice(session: Session, values: dict[str, Any]) -> int | None:
    """INSERT the (clock, level) row unless it exists; its id, or None when it did."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    stmt = (insert(m.SlaNotice).values(**values)
            .on_conflict_do_nothing(index_elements=["clock_id", "level"])
            .returning(m.SlaNotice.id))
    return session.execute(stmt).scalar()


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
            if not self.tick(at or utcnow(), result):
                break
        return result

    def tick(self, at: datetime, result: SweepResult) -> int:
        """One batch in one transaction; returns how many clocks it claimed."""
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            q = (select(m.SlaClock)
                 .where(m.SlaClock.next_notice_at.is_not(None), m.SlaClock.next_notice_at <= at)
                 .order_by(m.SlaClock.next_notice_at).limit(self.batch_size))
            if self._pg:
                q = q.with_for_update(skip_locked=True)
            clocks = list(s.scalars(q))
            if not clocks:
                return 0
            tickets = {t.id: t for t in s.scalars(
                select(m.Ticket).where(m.Ticket.id.in_({c.ticket_id for c in clocks})))}
            for clock in clocks:
                # A SAVEPOINT per clock: a template that does not render (a config mistake)
                # must not hold back every other clock of the batch, tick after tick.
                savepoint = s.begin_nested()
                try:
                    self._one(s, clock, tickets.get(clock.ticket_id), at, result)
                except TemplateError as exc:
                    savepoint.rollback()
                    self._failed(s, clock, at, exc, result)
                else:
                    savepoint.commit()
        result.batches += 1
        return len(clocks)

    def _failed(self, s: Session, clock: m.SlaClock, at: datetime, exc: TemplateError,
                result: SweepResult) -> None:
        name = getattr(exc, "name", None) or getattr(exc, "filename", None)
        line = getattr(exc, "lineno", None)
        where = f"templates/{name}" + (f":{line}" if line else "") if name else "templates"
        why = f"{where}: {type(exc).__name__}: {exc.message or exc}"
        log.error("SLA notice for clock %s (ticket %s) not sent, retried in %s: %s",
                  clock.id, clock.ticket_id, RETRY_FAILED, why)
        clock.next_notice_at = at + RETRY_FAILED
        s.add(m.Event(type="sla_notice_failed", ticket_id=clock.ticket_id, created_at=at,
                      data={"clock_id": clock.id, "level": clock.next_level, "error": why}))
        result.skipped.append({"clock_id": clock.id, "ticket_id": clock.ticket_id, "why": why})

    def _one(self, s: Session, clock: m.SlaClock, ticket: m.Ticket | None, at: datetime,
             result: SweepResult) -> None:
        sla = _sla(self.settings, clock.sla)

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
        cal = _calendar(self.settings, clock.calendar)
        hours = _calendar(self.settings, sla.calendar)
        level = sla.levels[clock.next_level]
        reached = _reached_at(clock, level.percent, cal)
        if reached > at:
            # Scheduled too early (the clock changed since): look again when it is reached.
            clock.next_notice_at = reached
            result.skipped.append({"clock_id": clock.id, "ticket_id": clock.ticket_id,
                                   "why": f"level {level.percent}% not reached until "
                                          f"{reached.isoformat()}"})
            return
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
            return
        kind = "breach" if level.percent >= 100 else "warning"
        notice_id = _insert_notice(s, {
            "clock_id": clock.id, "ticket_id": clock.ticket_id, "level": clock.next_level,
            "kind": kind, "percent": level.percent, "due_at": aware(clock.due_at) or due,
            "fired_at": at,
            "node": self.node, "actions": {}})
        index = clock.next_level
        # Advance first: whatever the actions make the SLA code do to this clock
        # (ticket_changed below) has the last word on it.
        clock.next_level = index + 1
        _schedule(clock, sla, cal)
        if notice_id is None:
            # Fired before (the guard row exists) but the clock was not advanced with it:
            # only possible if something else rewound next_level. Never twice.
            log.warning("sla clock %s level %s was already notified; advancing", clock.id, index)
            return
        changes, notes = apply_actions(s, self.settings, ticket, level.actions, at)
        notice = queue_notice(s, self.settings, self.renderer, ticket=ticket, clock=clock,
                              sla=sla, cal=hours, level_index=index, level=level,
                              reached_at=reached, at=at,
                              actions={"changes": changes, "notes": notes})
        done = {"changes": changes, "notes": notes, "recipients": notice.recipients,
                "unaddressed": notice.unaddressed, "template": notice.template,
                "outbox_id": notice.outbox_id, "article_id": notice.article_id}
        s.execute(update(m.SlaNotice).where(m.SlaNotice.id == notice_id).values(actions=done))
        s.add(m.Event(type=f"sla_{kind}", ticket_id=ticket.id, article_id=notice.article_id,
                      created_at=at, data={
                          "clock_id": clock.id, "sla": sla.name, "target": clock.target,
                          "level": index, "percent": level.percent,
                          "reached_at": reached.isoformat(), **done}))
        if changes:
            ticket_events.ticket_changed(
                s, self.settings, ticket, {k: (v[0], v[1]) for k, v in changes.items()},
                at=at, reason=f"SLA {sla.name} {clock.target} {kind} at {level.percent}%")
        result.fired.append(Fired(
            clock.id, ticket.id, ticket.number, sla.name, clock.target, index, level.percent,
            kind, reached.isoformat(), notice.recipients, changes))


def sweep(engine: Engine, settings: Settings, renderer: Renderer, *,
          at: datetime | None = None, batch_size: int | None = None) -> SweepResult:
    """One sweep now: what the scheduler job and ``mailgw sla sweep`` run."""
    return Sweeper(engine, settings, renderer, batch_size=batch_size).sweep(at)
