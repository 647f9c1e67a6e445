"""``mailgw sla apply``: put an edited ``slas:`` config in force on the tickets already open.

The worker chooses a ticket's SLA when the ticket is made and again when something that
selects it changes (queue, priority, customer, a rule; decision 24). An admin who adds an
SLA, changes a goal or a calendar, or removes one, expects it to hold for the open tickets
too, as in OTRS, where escalation times are computed from the SLA's current settings. This
goes over every ticket that is not closed (nor merged or deleted) and, per ticket:

* chooses the SLA again (a filter rule's choice stays, as on the hot path);
* an SLA that now applies and has no clock starts its clocks from the ticket's history, as
  if it had applied from the start (``_Clocks.backfill``: a goal already passed is breached
  at its real instant and notified by the next sweep);
* an open clock of another SLA, or of the same SLA whose goal or calendar was changed, is
  switched to the new goal and calendar from its start (``_Clocks.retarget``);
* an open clock of an SLA that no longer applies (or has no such goal any more) is
  cancelled.

Each ticket that changed gets an ``sla_applied`` event saying what was done. Tickets are
handled in chunks of ``CHUNK``, each in its own transaction, with the ticket rows locked
(PostgreSQL) or the one write lock held (SQLite), so a running gateway may go on storing
mail meanwhile. ``dry_run`` does the same work and rolls it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from mailgw.settings import Settings
from mailgw.sla.clocks import CANCEL_STATES, OPEN, _Clocks, goal_of
from mailgw.store import models as m

CHUNK = 200
ATTEMPTS = 3  # tries of a chunk that hit a deadlock (PostgreSQL)
TARGETS = ("first_response", "update", "solution")
EVENT = "sla_applied"


@dataclass
class Change:
    ticket: str
    sla: tuple[str | None, str | None]  # before, after
    reason: str | None
    started: list[str] = field(default_factory=list)  # targets whose clocks were started
    retargeted: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    paused: list[str] = field(default_factory=list)  # targets paused by the edit
    resumed: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"ticket": self.ticket, "sla": list(self.sla), "reason": self.reason,
                "started": self.started, "retargeted": self.retargeted,
                "cancelled": self.cancelled, "paused": self.paused, "resumed": self.resumed}


@dataclass
class Result:
    checked: int = 0
    changes: list[Change] = field(default_factory=list)
    dry_run: bool = False
    skipped: list[str] = field(default_factory=list)  # --ticket numbers closed or unknown

    def as_json(self) -> dict[str, Any]:
        return {"checked": self.checked, "changed": len(self.changes), "dry_run": self.dry_run,
                "skipped": self.skipped, "tickets": [c.as_json() for c in self.changes]}


def _open_clocks(tc: _Clocks) -> dict[int, tuple[str, str, str | None, int, str]]:
    return {c.id: (c.target, c.sla, c.calendar, c.goal_minutes, c.state) for c in tc.open()}


def apply_ticket(session: Session, settings: Settings, ticket: m.Ticket, at: datetime,
                 why: str = "mailgw sla apply") -> Change | None:
    """Choose ``ticket``'s SLA again under ``settings`` and bring its clocks in line; the
    change made, or None when nothing changed."""
    tc = _Clocks.load(session, settings, ticket, at)
    before_sla, before_reason = ticket.sla, ticket.sla_reason
    before = _open_clocks(tc)
    sla = tc.reselect(why)
    if sla is not None and ticket.state not in ("closed", *CANCEL_STATES) and any(
            goal_of(sla, target) is not None and not any(
                c.target == target and c.sla == sla.name for c in tc.clocks)
            for target in TARGETS):
        # A goal added to the SLA the ticket already had (reselect backfills only when the
        # SLA itself is new to the ticket).
        tc.backfill(sla, f"{why}; {ticket.sla_reason}")
    if sla is not None:
        for clock in list(tc.open()):
            if clock.sla != sla.name:
                continue
            goal = goal_of(sla, clock.target)
            if goal != clock.goal_minutes or clock.calendar != sla.calendar:
                tc.retarget(clock, sla, f"SLA {sla.name} edited in the config ({why}): its "
                                        "goals apply from the clock's start")
    # The SLA's pause states may have been edited, or the ticket moved to an SLA that
    # pauses in other states: the clocks follow the ticket's current state.
    tc.sync_state(sla, why)
    session.flush()
    after = _open_clocks(tc)
    change = Change(ticket.number or str(ticket.id), (before_sla, ticket.sla), ticket.sla_reason)
    for cid, (target, name, cal, goal, state) in before.items():
        if cid not in after:
            change.cancelled.append(f"{name} {target}")
            continue
        if after[cid][:4] != (target, name, cal, goal):
            change.retargeted.append(f"{target}: {name} -> {after[cid][1]}")
        if after[cid][4] != state:
            (change.paused if after[cid][4] == "paused" else change.resumed).append(target)
    change.started = [f"{t[1]} {t[0]}" for cid, t in after.items() if cid not in before]
    if ((before_sla, before_reason) == (ticket.sla, ticket.sla_reason)
            and not (change.started or change.retargeted or change.cancelled
                     or change.paused or change.resumed)):
        return None
    session.add(m.Event(type=EVENT, ticket_id=ticket.id, created_at=at, data={
        "reason": why, "sla": [before_sla, ticket.sla], "why": ticket.sla_reason,
        "started": change.started, "retargeted": change.retargeted,
        "cancelled": change.cancelled, "paused": change.paused,
        "resumed": change.resumed}))
    return change


def apply_slas(engine: Engine, settings: Settings, *, numbers: list[str] | None = None,
               dry_run: bool = False, at: datetime | None = None) -> Result:
    """Apply ``settings.slas`` to every ticket not closed (or to the tickets ``numbers``).
    ``at`` fixes the time (tests); by default each chunk takes the time once its rows are
    locked, so a long run never writes a ledger entry before one the worker wrote since."""
    result = Result(dry_run=dry_run)
    pg = engine.dialect.name == "postgresql"
    last = 0
    while True:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                chunk = _chunk(engine, settings, last, numbers, dry_run, at, pg)
                break
            except DBAPIError as exc:
                # A deadlock with a worker's batch (PostgreSQL): nothing of the chunk was
                # written; the worker retries its side too. Take the chunk again.
                code = getattr(exc.orig, "sqlstate", None)
                if code not in ("40P01", "40001") or attempt == ATTEMPTS:
                    raise
        if chunk is None:
            break
        last, checked, changes = chunk
        result.checked += checked
        result.changes += changes
    if numbers is not None:
        with Session(engine) as s:
            found = set(s.scalars(select(m.Ticket.number).where(
                m.Ticket.number.in_(numbers),
                m.Ticket.state.not_in(("closed", *CANCEL_STATES)))))
        result.skipped = [n for n in numbers if n not in found]
    return result


def _chunk(engine: Engine, settings: Settings, last: int, numbers: list[str] | None,
           dry_run: bool, at: datetime | None, pg: bool) -> tuple[int, int, list[Change]] | None:
    """The next ``CHUNK`` tickets after id ``last``, in one transaction: (last id, tickets
    checked, changes), or None when none is left."""
    with Session(engine) as s:
        s.begin()
        q = (select(m.Ticket).where(m.Ticket.id > last,
                                    m.Ticket.state.not_in(("closed", *CANCEL_STATES)))
             .order_by(m.Ticket.id).limit(CHUNK))
        if numbers is not None:
            q = q.where(m.Ticket.number.in_(numbers))
        if pg:
            q = q.with_for_update(of=m.Ticket)
        tickets = list(s.scalars(q))
        if not tickets:
            s.rollback()
            return None
        if pg:
            # The sweeper locks clocks, not tickets (SKIP LOCKED): it leaves these alone.
            s.execute(select(m.SlaClock.id).where(
                m.SlaClock.ticket_id.in_([t.id for t in tickets]),
                m.SlaClock.state.in_(OPEN)).order_by(m.SlaClock.id).with_for_update())
        stamp = at or datetime.now(UTC)
        changes = [c for t in tickets
                   if (c := apply_ticket(s, settings, t, stamp)) is not None]
        if dry_run:
            s.rollback()
        else:
            s.commit()
        return tickets[-1].id, len(tickets), changes
