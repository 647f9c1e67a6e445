"""Where the pipeline meets the worker: run it for one message, apply the decision to the
ticket, assign an owner, and record everything in the store for ``mailgw explain``.

Runs inside the worker's transaction (``mailgw/process.py``); nothing here commits.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from mailgw.assign import choose_owner
from mailgw.batch import batch_of
from mailgw.filters.engine import Decision, MessageView, Pipeline, Trace
from mailgw.settings import Settings
from mailgw.store import models as m
from mailgw.types import ParsedMail

# Ticket attributes a decision sets, and the ticket column each goes to.
_TICKET_FIELDS = {
    "queue": "queue", "priority": "priority", "urgency": "urgency", "impact": "impact",
    "type": "type", "service": "service", "category": "category", "customer": "customer",
    "company": "company", "owner": "owner", "state": "state", "sla": "sla",
}


def _aware(dt: datetime | None) -> datetime:
    if dt is None:
        return datetime.now(UTC)
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def run_filters(pipeline: Pipeline | None, mail: ParsedMail, row: m.Inbound, queue: str,
                ticket: m.Ticket | None) -> tuple[Decision, Trace | None]:
    """The decision for one message. Time conditions see the time it was received, so a
    replay decides as the first run did."""
    if pipeline is None:
        return Decision(queue=queue), None
    view = MessageView(mail, queue=queue, mail_from=row.mail_from, rcpt_tos=row.rcpt_tos,
                       ticket_state=ticket.state if ticket is not None else None,
                       ticket_queue=ticket.queue if ticket is not None else None,
                       now=_aware(row.received_at))
    return pipeline.run(view)


def _event(session: Session, type_: str, row: m.Inbound, ticket: m.Ticket | None,
           article: m.Article | None = None, **data: Any) -> None:
    batch = batch_of(session)
    if batch is not None:  # the worker's batch (mailgw/batch.py): written at its end
        batch.event(session, type=type_, created_at=datetime.now(UTC), data=data,
                    inbound_id=row.id, ticket_id=ticket.id if ticket else None,
                    article_id=article.id if article else None)
        return
    session.add(m.Event(type=type_, created_at=datetime.now(UTC), data=data, inbound_id=row.id,
                        ticket_id=ticket.id if ticket else None,
                        article_id=article.id if article else None))


def trace_json(decision: Decision, trace: Trace | None) -> dict[str, Any] | None:
    if trace is None:
        return None
    return {**trace.as_json(), "decision": {k: v for k, v in decision.as_dict().items()
                                            if v not in (None, False, [], {})},
            "set_by": dict(decision.set_by)}


def drop_message(session: Session, row: m.Inbound, decision: Decision,
                 trace: Trace | None) -> bool:
    """Ignore or reject: the raw mail stays in the inbound row, no ticket, no reply."""
    if not (decision.ignore or decision.reject):
        return False
    kind = "reject" if decision.reject else "ignore"
    _event(session, "filter_rejected" if decision.reject else "filter_ignored", row, None, rule=decision.set_by.get(kind),
           trace=trace_json(decision, trace))
    return True


def apply_decision(session: Session, settings: Settings, row: m.Inbound, ticket: m.Ticket,
                   article: m.Article, decision: Decision, trace: Trace | None, *,
                   new: bool) -> None:
    """Set what the rules decided on the ticket and pick an owner for a new ticket."""
    article.filter_trace = trace_json(decision, trace)
    changes: dict[str, list[Any]] = {}
    for key, column in _TICKET_FIELDS.items():
        value = getattr(decision, key)
        # Only what a rule (or the priority matrix) set: the decision's queue starts as the
        # recipient's queue, which must not move a follow-up back out of the queue it is in.
        if value is None or key not in decision.set_by:
            continue
        old = getattr(ticket, column)
        if old != value:
            setattr(ticket, column, value)
            changes[column] = [old, value]
    if "sla" in changes:
        # The SLA clocks (mailgw/sla) keep a rule's choice over slas: applies_to.
        ticket.sla_reason = f"rule {decision.set_by.get('sla')}"
    if "state" in changes:  # only #pending sets a pending time; a rule's state ends it
        ticket.pending_until = ticket.pending_action = None
    if decision.state == "closed" and ticket.closed_at is None:
        ticket.closed_at = datetime.now(UTC)
    if decision.tags:
        tags = list(ticket.tags or [])
        merged = tags + [t for t in decision.tags if t not in tags]
        if merged != tags:
            ticket.tags, changes["tags"] = merged, [tags, merged]
    if decision.fields:
        fields = dict(ticket.custom_fields or {})
        merged_f = {**fields, **decision.fields}
        if merged_f != fields:
            ticket.custom_fields, changes["custom_fields"] = merged_f, [fields, merged_f]
    if changes and trace is not None:
        _event(session, "filters_applied", row, ticket, article, changes=changes,
               rules=trace.matched, set_by=dict(decision.set_by), new_ticket=new)
    if trace is not None and trace.errors:
        _event(session, "filter_errors", row, ticket, article, errors=trace.errors)
    if new and ticket.owner is None:
        queue = settings.queue(ticket.queue)
        if queue is not None and queue.assignment is not None:
            result = choose_owner(session, settings, queue, tags=list(ticket.tags or []),
                                  customer=ticket.customer, at=datetime.now(UTC),
                                  exclude_ticket=ticket.id)
            ticket.owner = result.owner
            _event(session, "assigned", row, ticket, article, **result.as_json())
    elif new and ticket.owner is not None:
        _event(session, "assigned", row, ticket, article, owner=ticket.owner, strategy="rule",
               reason=f"set by rule {decision.set_by.get('owner')!r}", candidates=[],
               unavailable={})
