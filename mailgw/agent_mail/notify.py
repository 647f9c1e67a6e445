"""Tell agents of customer mail, by mail they can answer (docs/agent-mail.md).

Runs in the worker's transaction after the customer's article is stored, like the
acknowledgement: each notification is rendered (``templates/agent_new_ticket.j2``,
``agent_followup.j2``), stored as an internal system article (the ticket's history shows
who was told, and a bounce finds it through the VERP return path) and queued in the
outbox. Its Reply-To is the agent's signed ``+t.`` address for the ticket; the body names
the ``+c.`` address for internal notes.

Notifications are not counted by the loop protection (``mailgw.loops``): that limits
automatic mail to strangers, and an agent of a busy queue gets more than 40 a day.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgw import ticket_events
from mailgw.agent_mail.tokens import make_address
from mailgw.batch import batch_of
from mailgw.numbers import tag_subject
from mailgw.outbound.render import Renderer, build_message
from mailgw.outbound.verp import signer_for
from mailgw.settings import Agent, Queue, Settings
from mailgw.store import models as m
from mailgw.types import ParsedMail

__all__ = ["notify_agents", "queue_agent_mail", "recipients"]


def recipients(settings: Settings, ticket: m.Ticket, *, new_ticket: bool) -> list[Agent]:
    """The agents to tell, per ``agent_mail.notify``. Agents marked out of office and agents
    without an address are left out; the owner is told even when away (it is their ticket)."""
    notify = settings.agent_mail.notify
    mode = notify.new_ticket if new_ticket else notify.followup
    if mode == "none":
        return []
    owner = settings.agent(ticket.owner) if ticket.owner else None
    if mode == "owner" or (mode == "owner_or_queue" and owner is not None):
        return [owner] if owner is not None and owner.addresses else []
    return [a for a in settings.agents
            if ticket.queue in a.queues and a.addresses and not a.out_of_office]


def thread_root(session: Session, ticket: m.Ticket) -> str | None:
    """The Message-ID of the ticket's first article that has one: leads every References."""
    q = (select(m.Article.id, m.Article.message_id)
         .where(m.Article.ticket_id == ticket.id, m.Article.message_id.is_not(None))
         .order_by(m.Article.id).limit(1))
    batch = batch_of(session)
    if batch is None:
        row = session.execute(q).first()
        return row.message_id if row else None
    # The worker's batch (mailgw/batch.py): the store's first, or the batch's own first if
    # it comes before (its rows are not flushed yet; ids follow the order rows were made).
    mine = batch.first_message_id(ticket.id)
    if ticket.id in batch.new_tickets:
        # Opened in this batch: every article it has is the batch's (flushed or not; the
        # batch's own rows go in at its end), so the store has nothing earlier to add.
        return mine[1] if mine is not None else None
    row = session.connection().execute(q).first()
    if mine is not None and (row is None or mine[0] < row.id):
        return mine[1]
    return row.message_id if row else None


def queue_agent_mail(session: Session, settings: Settings, *, ticket: m.Ticket | None,
                     queue: Queue, agent: Agent, subject: str, body: str, from_name: str,
                     reply_to: str | None, in_reply_to: str | None, references: list[str],
                     auto_submitted: str, why: str, at: datetime) -> m.Outbox:
    """Queue one mail to an agent from the queue address: an internal system article on the
    ticket (when there is one) and its outbox row with a VERP envelope sender."""
    signer = signer_for(settings)
    message_id = signer.message_id(ticket.id if ticket is not None else None)
    if ticket is not None and ticket.number:
        subject = tag_subject(settings.ticket_numbers, ticket.number, subject)
    to = agent.addresses[0]
    headers = {
        # RFC 3834: ours, automatic; and please no out-of-office answers to it (Exchange).
        "Auto-Submitted": auto_submitted,
        "X-Auto-Response-Suppress": "All",
        settings.loop_header: queue.from_address,
    }
    if reply_to:
        headers["Reply-To"] = reply_to
    if ticket is not None:
        headers["X-Mailgw-Ticket"] = ticket.number or ""
    raw = build_message(
        from_addr=queue.from_address, from_name=from_name, to=[to], subject=subject,
        body=body, message_id=message_id, in_reply_to=in_reply_to, references=references,
        extra_headers=headers)
    article = None
    if ticket is not None:
        article = m.Article(
            ticket_id=ticket.id, direction="out", sender_type="system", internal=True,
            agent=agent.name, from_addr=queue.from_address, from_name=from_name[:500],
            to_addrs=to, subject=subject, message_id=message_id, in_reply_to=in_reply_to,
            references=" ".join(references) or None, body_text=body,
            threaded_by="agent_mail", thread_reason=why, is_automatic=True,
            automatic_reason=why, delivery_state="queued", created_at=at)
        session.add(article)
        if article.id is None:  # in the worker's batch it has its id already
            session.flush()
    envelope_from = (signer.verp_address(article.id, queue.from_address)
                     if signer.verp and article is not None else queue.from_address)
    out = m.Outbox(
        ticket_id=ticket.id if ticket is not None else None,
        article_id=article.id if article is not None else None, mail_from=envelope_from,
        rcpt_tos=[to], message_id=message_id, raw=raw, state="pending", attempts=0,
        next_attempt_at=at, created_at=at)
    session.add(out)
    if article is not None and ticket is not None:
        ticket_events.article_added(session, settings, ticket, article, new_ticket=False, at=at)
    return out


def notify_agents(session: Session, settings: Settings, renderer: Renderer, row: m.Inbound,
                  ticket: m.Ticket, article: m.Article, mail: ParsedMail, *,
                  new_ticket: bool, at: datetime) -> int:
    """Queue the notifications for a stored customer article; returns how many. Costs
    nothing when agent mail is off or no agent is configured."""
    if not settings.agents or not settings.agent_mail.enabled:
        return 0
    if article.is_automatic or article.sender_type != "customer":
        return 0  # out-of-office and other automatic mail: on the ticket, no one is paged
    agents = recipients(settings, ticket, new_ticket=new_ticket)
    if not agents:
        return 0
    queue = settings.queue(ticket.queue)
    if queue is None:
        return 0
    tag = f"[{settings.ticket_numbers.hook}{ticket.number}]"
    customer_name = article.from_name or article.from_addr or ticket.customer
    from_name = f"{customer_name} via {queue.sender_name or queue.name}"
    root = article.message_id if new_ticket else thread_root(session, ticket)
    chain = mail.references + ([mail.message_id] if mail.message_id else [])
    references = list(dict.fromkeys(([root] if root else []) + chain[-19:]))
    template = "agent_new_ticket" if new_ticket else "agent_followup"
    base: dict[str, Any] = {
        "ticket": {"number": ticket.number, "title": ticket.title, "queue": ticket.queue,
                   "state": ticket.state, "priority": ticket.priority, "owner": ticket.owner},
        "article": {"subject": article.subject, "from_addr": article.from_addr,
                    "from_name": article.from_name,
                    "text": article.visible_text or article.body_text},
        "customer": {"name": customer_name, "address": article.from_addr},
        "queue": {"name": queue.name, "address": queue.from_address}, "tag": tag,
        "max_age_days": settings.agent_mail.max_age_days,
    }
    for agent in agents:
        reply = make_address(settings, queue, "t", agent, ticket.id, at)
        note = make_address(settings, queue, "c", agent, ticket.id, at)
        rendered = renderer.render(template, {**base, "agent": {"name": agent.name},
                                              "reply_address": reply, "note_address": note})
        out = queue_agent_mail(
            session, settings, ticket=ticket, queue=queue, agent=agent,
            subject=rendered.subject, body=rendered.body, from_name=from_name, reply_to=reply,
            in_reply_to=mail.message_id, references=references,
            auto_submitted="auto-generated", why=f"notification to {agent.name} ({template})",
            at=at)
        session.add(m.Event(type="agent_notified", created_at=at, inbound_id=row.id,
                            ticket_id=ticket.id, article_id=out.article_id,
                            data={"agent": agent.name, "template": template,
                                  "to": agent.addresses[0]}))
    return len(agents)


def notify_pending_reminder(session: Session, settings: Settings, renderer: Renderer,
                            ticket: m.Ticket, *, until: datetime | None, at: datetime) -> int:
    """Tell the owner (or, without one, the queue's agents) that a ``#pending`` time has
    passed and the ticket is open again (OTRS's "pending reminder reached"); returns how
    many were told. Nothing when agent mail is off."""
    if not settings.agents or not settings.agent_mail.enabled:
        return 0
    queue = settings.queue(ticket.queue)
    if queue is None:
        return 0
    owner = settings.agent(ticket.owner) if ticket.owner else None
    agents = ([owner] if owner is not None and owner.addresses else
              [a for a in settings.agents
               if ticket.queue in a.queues and a.addresses and not a.out_of_office])
    root = thread_root(session, ticket)
    base: dict[str, Any] = {
        "ticket": {"number": ticket.number, "title": ticket.title, "queue": ticket.queue,
                   "state": ticket.state, "priority": ticket.priority, "owner": ticket.owner,
                   "customer": ticket.customer},
        "queue": {"name": queue.name, "address": queue.from_address},
        "tag": f"[{settings.ticket_numbers.hook}{ticket.number}]",
        "pending_until": until.isoformat() if until else None,
        "max_age_days": settings.agent_mail.max_age_days,
    }
    for agent in agents:
        reply = make_address(settings, queue, "t", agent, ticket.id, at)
        note = make_address(settings, queue, "c", agent, ticket.id, at)
        rendered = renderer.render("agent_pending_reminder", {
            **base, "agent": {"name": agent.name}, "reply_address": reply,
            "note_address": note})
        out = queue_agent_mail(
            session, settings, ticket=ticket, queue=queue, agent=agent,
            subject=rendered.subject, body=rendered.body,
            from_name=queue.sender_name or queue.name, reply_to=reply, in_reply_to=root,
            references=[root] if root else [], auto_submitted="auto-generated",
            why=f"pending reminder to {agent.name}", at=at)
        session.add(m.Event(type="agent_notified", created_at=at, ticket_id=ticket.id,
                            article_id=out.article_id,
                            data={"agent": agent.name, "template": "agent_pending_reminder",
                                  "to": agent.addresses[0]}))
    return len(agents)
