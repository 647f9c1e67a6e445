"""Escalation notices: the templated mail an SLA level sends to agents (docs/sla-escalations.md).

A notice is rendered and queued into the outbox inside the sweep's transaction, like an
acknowledgement (mailgw/process.py ``_queue_ack``): the ``sla_notices`` row, the mail and
the level's actions commit together or not at all. It is kept as an outgoing ``system``
article of the ticket, so the ticket's history shows it, a bounce names it by its VERP
address, and an agent's reply to it threads into the ticket. Notices go to agents, not
customers: the customers' loop-protection counters are not touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgw.calendar import Calendar
from mailgw.numbers import subject_tag, tag_subject
from mailgw.outbound.render import Renderer, build_message
from mailgw.outbound.verp import signer_for
from mailgw.settings import Settings, Sla, SlaLevel
from mailgw.store import models as m

# Template names a level uses unless it names its own (`template:`).
WARNING_TEMPLATE, BREACH_TEMPLATE = "sla_warning", "sla_breach"
# A notice sent this much after its level was reached says when it really was (deferred to
# working hours, or the sweep was not running).
_DELAYED = timedelta(minutes=1)


@dataclass(frozen=True)
class Notice:
    """What one level's notice did: who it went to, and the outbox row (None: nobody)."""

    recipients: list[str]
    unaddressed: list[str]  # entries of `notify` that named nobody, with why
    template: str
    outbox_id: int | None
    article_id: int | None


def aware(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def recipients(settings: Settings, ticket: m.Ticket, level: SlaLevel) -> tuple[list[str], list[str]]:
    """The addresses of a level's ``notify`` entries: ``owner`` (the owning agent's first
    address), ``queue_agents`` (every agent listing the ticket's queue) or a literal
    address. Returns (addresses, entries that gave none with the reason)."""
    out: list[str] = []
    missing: list[str] = []
    for entry in level.notify:
        if entry == "owner":
            if not ticket.owner:
                missing.append("owner: the ticket has no owner")
                continue
            agent = settings.agent(ticket.owner)
            if agent is not None and agent.addresses:
                out.append(agent.addresses[0])
            elif "@" in ticket.owner:
                out.append(ticket.owner.lower())
            else:
                missing.append(f"owner: agent {ticket.owner!r} has no address")
        elif entry == "queue_agents":
            found = [a.addresses[0] for a in settings.agents
                     if ticket.queue in a.queues and a.addresses]
            if not found:
                missing.append(f"queue_agents: no agent with an address serves {ticket.queue!r}")
            out += found
        elif "@" in entry:
            out.append(entry.strip().lower())
        else:
            missing.append(f"{entry!r} is neither owner, queue_agents nor an address")
    return list(dict.fromkeys(out)), missing


def _local(cal: Calendar, dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return cal.local(aware(dt)).strftime("%Y-%m-%d %H:%M %Z")  # type: ignore[arg-type]


def queue_notice(session: Session, settings: Settings, renderer: Renderer, *,
                 ticket: m.Ticket, clock: m.SlaClock, sla: Sla, cal: Calendar,
                 level_index: int, level: SlaLevel, reached_at: datetime, at: datetime,
                 actions: dict[str, Any]) -> Notice:
    """Render the level's notice and queue it in the outbox (no commit). ``reached_at`` is
    when the level was really reached; ``at`` is now (later when the notice was deferred
    to working hours). ``actions`` is what the level did to the ticket, for the text."""
    kind = "breach" if level.percent >= 100 else "warning"
    template = level.template or (BREACH_TEMPLATE if kind == "breach" else WARNING_TEMPLATE)
    to, missing = recipients(settings, ticket, level)
    if not to:
        session.add(m.Event(type="sla_notice_unaddressed", ticket_id=ticket.id, created_at=at,
                            data={"clock_id": clock.id, "sla": sla.name, "target": clock.target,
                                  "level": level_index, "percent": level.percent,
                                  "notify": list(level.notify), "why": missing}))
        return Notice([], missing, template, None, None)

    queue = settings.queue(ticket.queue) or settings.queues[0]
    number = ticket.number or ""
    cfg = settings.ticket_numbers
    tag = subject_tag(cfg, number)
    # Templates see plain values, not ORM objects: their variables are a documented contract
    # (templates/sla_warning.j2).
    rendered = renderer.render(template, {
        "ticket": {"number": number, "title": ticket.title, "queue": ticket.queue,
                   "state": ticket.state, "priority": ticket.priority,
                   "customer": ticket.customer, "owner": ticket.owner},
        "clock": {"target": clock.target, "goal_minutes": clock.goal_minutes,
                  "business": clock.calendar is not None, "calendar": clock.calendar,
                  "started_at": _local(cal, clock.started_at), "due_at": _local(cal, clock.due_at),
                  "cycle": clock.cycle},
        "sla": {"name": sla.name, "calendar": sla.calendar},
        "level": level_index + 1, "levels": len(sla.levels), "percent": level.percent,
        "kind": kind, "reached_at": _local(cal, reached_at), "sent_at": _local(cal, at),
        "delayed": at - reached_at > _DELAYED,
        "owner": ticket.owner, "queue": {"name": queue.name, "address": queue.from_address},
        "tag": tag, "actions": actions,
    })
    signer = signer_for(settings)
    message_id = signer.message_id(ticket.id)
    # The ticket's first message leads References, so agents' clients file the notice in
    # the ticket's thread.
    root = session.scalar(select(m.Article.message_id).where(
        m.Article.ticket_id == ticket.id, m.Article.message_id.is_not(None))
        .order_by(m.Article.id).limit(1))
    references = [root] if root else []
    subject = tag_subject(cfg, number, rendered.subject)
    raw = build_message(
        from_addr=queue.from_address, from_name=queue.sender_name, to=to, subject=subject,
        body=rendered.body, message_id=message_id, in_reply_to=root, references=references,
        extra_headers={
            # RFC 3834: generated by us, not a reply to anyone; ask others not to answer.
            "Auto-Submitted": "auto-generated",
            "X-Auto-Response-Suppress": "All",
            "Precedence": "bulk",
            settings.loop_header: queue.from_address,
            "X-Mailgw-Ticket": number,
            "X-Mailgw-SLA": f"{sla.name} {clock.target} {kind} {level.percent}%",
        },
    )
    article = m.Article(
        ticket_id=ticket.id, direction="out", sender_type="system",
        from_addr=queue.from_address, from_name=queue.sender_name or "",
        to_addrs=", ".join(to), subject=subject, message_id=message_id, in_reply_to=root,
        references=" ".join(references) or None, body_text=rendered.body,
        threaded_by="sla_notice",
        thread_reason=f"SLA {sla.name} {clock.target} {kind} at {level.percent}% ({template})",
        is_automatic=True, automatic_reason="SLA escalation notice", delivery_state="queued",
        created_at=at,
    )
    session.add(article)
    session.flush()
    envelope_from = (signer.verp_address(article.id, queue.from_address) if signer.verp
                     else queue.from_address)
    out = m.Outbox(ticket_id=ticket.id, article_id=article.id, mail_from=envelope_from,
                   rcpt_tos=to, message_id=message_id, raw=raw, state="pending", attempts=0,
                   next_attempt_at=at, created_at=at)
    session.add(out)
    session.flush()
    return Notice(to, missing, template, out.id, article.id)
