"""Auto-assignment of new tickets to agents, per queue (``queues[].assignment``).

Strategies: ``round_robin`` (the next available agent after the one who got the queue's last
ticket),
``least_open`` (the available agent with the fewest new/open/pending tickets), ``skills``
(agents whose skills cover the ticket's tags that are skills at all; the least loaded of
them). ``sticky: true`` first tries the owner of the customer's last ticket. Every strategy
only picks agents who are available now: not out of office, and inside their working hours.
When nobody is, the ticket stays unassigned in its queue. The result says why. Whatever the
strategy, the queue's cursor row is locked while choosing, so workers on several nodes take
turns (the second sees the first's committed ticket when it counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailgw.calendar import ALWAYS, Calendar
from mailgw.settings import Agent, Queue, Settings, per_settings
from mailgw.store import models as m

OPEN_STATES = ("new", "open", "pending")

@dataclass
class Assignment:
    owner: str | None
    strategy: str
    reason: str
    candidates: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"owner": self.owner, "strategy": self.strategy, "reason": self.reason,
                "candidates": self.candidates, "unavailable": self.unavailable}


@per_settings
def _calendars(settings: Settings) -> dict[str, Calendar]:
    cals = {c.name: Calendar(c) for c in settings.calendars}
    for a in settings.agents:
        if a.calendar is None and a.working_hours is not None:
            cals[f"agent:{a.name}"] = Calendar(a.working_hours)
    return cals


def unavailable_reason(agent: Agent, settings: Settings, at: datetime) -> str | None:
    """None when the agent can take a ticket now, else why not."""
    if agent.out_of_office:
        return "out of office"
    cals = _calendars(settings)
    cal = cals.get(agent.calendar or f"agent:{agent.name}", ALWAYS)
    if not cal.is_working_time(at):
        local = cal.local(at).strftime("%a %H:%M %Z")
        return f"outside working hours ({local})"
    return None


def queue_agents(settings: Settings, queue: Queue) -> list[Agent]:
    names = queue.assignment.agents if queue.assignment else None
    if names is not None:
        return [a for n in names if (a := settings.agent(n)) is not None]
    return [a for a in settings.agents if queue.name in a.queues]


def open_counts(session: Session, names: list[str]) -> dict[str, int]:
    rows = session.execute(select(m.Ticket.owner, func.count()).where(
        m.Ticket.owner.in_(names), m.Ticket.state.in_(OPEN_STATES)).group_by(m.Ticket.owner))
    counts = dict.fromkeys(names, 0)
    counts.update({owner: n for owner, n in rows})
    return counts


def _least_open(session: Session, agents: list[Agent]) -> tuple[Agent, int]:
    counts = open_counts(session, [a.name for a in agents])
    # Ties go to the agent listed first, so the order in the config is a stable tiebreak.
    best = min(agents, key=lambda a: counts[a.name])
    return best, counts[best.name]


def _lock_queue(session: Session, queue: Queue, at: datetime) -> m.AssignmentCursor:
    """Lock the queue's assignment cursor row (created if missing without racing another
    worker: ON CONFLICT DO NOTHING) until the transaction ends. Every strategy takes it before
    looking at the agents' load, so two workers (or nodes) assigning in the same queue take
    turns: the second counts after the first has committed its ticket, instead of both giving
    theirs to the same least-loaded agent. On SQLite the write transaction already serialises."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    session.execute(insert(m.AssignmentCursor).values(
        queue=queue.name, last_agent=None, updated_at=at).on_conflict_do_nothing(
        index_elements=["queue"]))
    return session.scalars(select(m.AssignmentCursor)
                           .where(m.AssignmentCursor.queue == queue.name)
                           .with_for_update()).one()


def _round_robin(cursor: m.AssignmentCursor, agents: list[Agent], everyone: list[Agent],
                 at: datetime) -> Agent:
    order = [a.name for a in everyone]
    start = order.index(cursor.last_agent) + 1 if cursor.last_agent in order else 0
    ring = order[start:] + order[:start]
    pick = next(a for name in ring for a in agents if a.name == name)
    cursor.last_agent, cursor.updated_at = pick.name, at
    return pick


def choose_owner(session: Session, settings: Settings, queue: Queue, *, tags: list[str],
                 customer: str, at: datetime, exclude_ticket: int | None = None) -> Assignment:
    """Pick the owner of a new ticket in ``queue``; ``Assignment.owner`` None: the queue."""
    cfg = queue.assignment
    if cfg is None:
        return Assignment(None, "none", "the queue has no assignment strategy")
    everyone = queue_agents(settings, queue)
    unavailable = {a.name: r for a in everyone
                   if (r := unavailable_reason(a, settings, at)) is not None}
    agents = [a for a in everyone if a.name not in unavailable]
    result = Assignment(None, cfg.strategy, "", [a.name for a in agents], unavailable)
    if not everyone:
        result.reason = "no agent serves the queue; it stays in the queue"
        return result
    if not agents:
        result.reason = "no agent is available; it stays in the queue"
        return result
    cursor = _lock_queue(session, queue, at)
    if cfg.sticky and customer:
        q = select(m.Ticket.owner).where(m.Ticket.customer == customer,
                                         m.Ticket.owner.is_not(None))
        if exclude_ticket is not None:
            q = q.where(m.Ticket.id != exclude_ticket)
        last = session.scalar(q.order_by(m.Ticket.id.desc()).limit(1))
        if last is not None:
            if any(a.name == last for a in agents):
                result.owner, result.strategy = last, "sticky"
                result.reason = f"sticky: {last} owned this customer's last ticket"
                return result
            why = unavailable.get(last, "not an agent of this queue")
            result.reason = f"sticky owner {last} skipped ({why}); "
    if cfg.strategy == "round_robin":
        pick = _round_robin(cursor, agents, everyone, at)
        result.owner = pick.name
        result.reason += "round robin: next available agent after the queue's last owner"
    elif cfg.strategy == "least_open":
        pick, n = _least_open(session, agents)
        result.owner = pick.name
        result.reason += f"least open: {pick.name} has {n} open ticket(s)"
    else:
        known = {s for a in everyone for s in a.skills}
        needed = [t for t in tags if t in known]
        if not needed:
            pick, n = _least_open(session, agents)
            result.owner = pick.name
            result.reason += (f"skills: no tag is a skill ({', '.join(tags) or 'no tags'}); "
                              f"least open: {pick.name} has {n}")
            return result
        best = max(len(set(needed) & set(a.skills)) for a in agents)
        if best == 0:
            result.reason += (f"skills: no available agent has {', '.join(needed)}; "
                              "it stays in the queue")
            return result
        skilled = [a for a in agents if len(set(needed) & set(a.skills)) == best]
        pick, n = _least_open(session, skilled)
        result.owner = pick.name
        result.candidates = [a.name for a in skilled]
        result.reason += (f"skills: {pick.name} has {best} of {', '.join(needed)} and "
                          f"{n} open ticket(s)")
    return result
