"""Turn one inbound message into a ticket article, and queue the acknowledgement.

Everything here runs inside the worker's transaction: the ticket, the article, its
attachments, the events that explain each decision, the outgoing acknowledgement in the
outbox and the inbound row's ``done`` mark are committed together or not at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from mailgw import loops, ticket_events
from mailgw.agent_mail.inbound import handle_agent_mail
from mailgw.agent_mail.notify import notify_agents, thread_root
from mailgw.batch import batch_of
from mailgw.filters.apply import apply_decision, drop_message, run_filters
from mailgw.filters.engine import Pipeline
from mailgw.machine_mail import handle_machine_mail, ours_for
from mailgw.mail.classify import Classification, classify, unanswerable
from mailgw.mail.ids import clip_id
from mailgw.mail.parse import parse_message
from mailgw.mail.reply import ReplyParts, reply_parts
from mailgw.numbers import format_number, subject_pattern, tag_subject
from mailgw.outbound.render import Renderer, build_message
from mailgw.outbound.verp import signer_for
from mailgw.queue import now
from mailgw.settings import Queue, Settings
from mailgw.store import models as m
from mailgw.threader import ThreadMatch, find_ticket
from mailgw.types import ParsedMail

# In the worker's batch, the attachments of mail under SMALL_MAIL are inserted at its end
# while they stay under BATCH_ATTACHMENTS.
SMALL_MAIL = 1024 * 1024
BATCH_ATTACHMENTS = 8 * 1024 * 1024

# Good enough to tell an address from junk such as "@host" or "undisclosed-recipients:;".
_ADDRESS = re.compile(r"[^@\s<>,;:]+@[^@\s<>,;:]+\.[^@\s<>,;:]+")


class Quarantine(Exception):
    """The message cannot be processed as configured; keep it for an admin to look at."""


@dataclass(frozen=True)
class Context:
    settings: Settings
    renderer: Renderer
    pipeline: Pipeline | None = None  # the filter rules (issue 4); None: no filters


@dataclass(frozen=True, slots=True)
class Prepared:
    """What ``process`` works out from a message alone, before any look-up: its class and
    the parts of its text. The worker computes it in its parse step (``prepare``), outside
    the write transaction (on SQLite: not under the one write lock); ``process`` uses it
    for the very ``mail`` object it was computed from, and computes it itself otherwise."""
    mail: ParsedMail
    cls: Classification
    parts: ReplyParts


def prepare(mail: ParsedMail, raw: bytes | None, mail_from: str | None,
            rcpt_tos: list[str] | tuple[str, ...], settings: Settings) -> Prepared:
    """``classify`` and ``reply_parts`` of one message, exactly as ``process`` calls them.
    Both are functions of the message, its envelope and the settings only."""
    return Prepared(mail, classify(mail, mail_from, raw=raw, rcpt_tos=rcpt_tos,
                                   ours=ours_for(settings)),
                    reply_parts(mail.text, mail.raw_html))


def _prepared(session: Session, row: m.Inbound, mail: ParsedMail) -> Prepared | None:
    batch = batch_of(session)
    prep = batch.prepared.get(row.id) if batch is not None else None
    return prep if prep is not None and prep.mail is mail else None


def parts_of(session: Session, row: m.Inbound, mail: ParsedMail) -> ReplyParts:
    """``reply_parts(mail.text, mail.raw_html)``, computed beforehand in the worker's batch."""
    prep = _prepared(session, row, mail)
    return prep.parts if prep is not None else reply_parts(mail.text, mail.raw_html)


def _clean(text: str | None, limit: int | None = None) -> str:
    # PostgreSQL text cannot hold NUL characters; real mail sometimes has them.
    text = (text or "").replace("\x00", "")
    return text[:limit] if limit else text


def _event(session: Session, type_: str, row: m.Inbound | None, ticket: m.Ticket | None,
           article: m.Article | int | None = None, **data: Any) -> None:
    """Record a decision; ``article`` is the article or its id."""
    article_id = article if isinstance(article, int) or article is None else article.id
    batch = batch_of(session)
    if batch is not None:  # the worker's batch: one INSERT for its events at the end
        batch.event(session, type=type_, created_at=now(), data=data,
                    inbound_id=row.id if row else None,
                    ticket_id=ticket.id if ticket else None, article_id=article_id)
        return
    session.add(m.Event(
        type=type_, created_at=now(), data=data,
        inbound_id=row.id if row else None,
        ticket_id=ticket.id if ticket else None, article_id=article_id,
    ))


def queue_for(row: m.Inbound, settings: Settings) -> Queue:
    if row.queue:
        q = settings.queue(row.queue)
        if q is None:
            raise Quarantine(f"queue {row.queue!r} given at delivery is not configured")
        return q
    for rcpt in row.rcpt_tos:
        q = settings.queue_for_recipient(rcpt)
        if q is not None:
            return q
    if not row.rcpt_tos and settings.default_queue:
        return settings.queue(settings.default_queue)  # type: ignore[return-value]
    raise Quarantine(f"no configured queue serves {', '.join(row.rcpt_tos) or 'an empty recipient list'}")


def _redelivery_of(session: Session, row: m.Inbound) -> int | None:
    """The id of an earlier, processed copy of this very delivery (same bytes, same envelope
    recipients, same forced queue), or None. The same message delivered for another queue or
    recipient is not a redelivery: each delivery makes its article."""
    if session.get_bind().dialect.name == "postgresql":
        # Two workers holding two copies at once would each see no processed copy; the
        # second waits here until the first commits, then sees it.
        session.execute(select(func.pg_advisory_xact_lock(int(row.sha256[:15], 16))))
    for other_id, rcpts, queue in session.execute(
        select(m.Inbound.id, m.Inbound.rcpt_tos, m.Inbound.queue).where(
            m.Inbound.sha256 == row.sha256, m.Inbound.id != row.id, m.Inbound.state == "done")
    ):
        if sorted(rcpts) == sorted(row.rcpt_tos) and queue == row.queue:
            return other_id
    return None


def process(session: Session, row: m.Inbound, ctx: Context,
            parsed: ParsedMail | Exception | None = None, *,
            redelivery: Callable[[Session, m.Inbound], int | None] | None = None) -> None:
    """Store one message. ``parsed`` is the message parsed beforehand (outside the write
    transaction), or the exception parsing raised; None parses here. ``redelivery`` answers
    the redelivery check for a whole batch (``mailgw.worker``); None asks the store here."""
    settings = ctx.settings
    duplicate = (redelivery or _redelivery_of)(session, row)
    if duplicate is not None:
        # An MTA that missed our 250 delivers the same bytes again: one article is enough.
        row.state, row.processed_at = "done", now()
        _event(session, "duplicate_ignored", row, None, same_as_inbound=duplicate)
        return

    if isinstance(parsed, Exception):
        raise parsed
    mail = parsed if parsed is not None else parse_message(row.raw)
    # Classified once (docs/machine-mail.md). Bounces and our own mail coming back never
    # open a ticket: they attach to the ticket of the mail they refer to, or are recorded.
    prep = _prepared(session, row, mail)
    cls = prep.cls if prep is not None else classify(
        mail, row.mail_from, raw=row.raw, rcpt_tos=row.rcpt_tos, ours=ours_for(settings))
    if handle_machine_mail(session, row, mail, cls, _store_article, _event,
                           loop=settings.loop_protection):
        return
    # Agents' answers, notes and commands by signed reply address (docs/agent-mail.md).
    if handle_agent_mail(session, row, mail, cls, settings, ctx.renderer):
        return
    queue = queue_for(row, settings)
    sender = sender_of(mail, row)
    auto = cls.reason

    match = _find_ticket(session, mail, settings, sender)
    ticket, by, reason = match.ticket, match.by, match.reason
    if ticket is None:
        batch = batch_of(session)
        note = batch.hold_notes.get(row.id) if batch is not None else None
        if note:  # held back for its original as long as a reply is (worker.py)
            reason += f"; {note}"
    reopened = rejected = False
    if ticket is not None and ticket.state == "closed" and auto:
        # An out-of-office or other automatic answer is kept on the ticket but neither
        # reopens it nor opens a new one.
        rejected = True
        reason += "; the ticket is closed and automatic mail does not reopen it"
    elif ticket is not None and ticket.state == "closed":
        policy = (settings.queue(ticket.queue) or queue).on_closed_reply
        if policy == "reopen":
            reopened = True
            reason += "; the ticket was closed and is reopened (queue policy reopen)"
        elif policy == "new_ticket":
            reason += f"; ticket {ticket.number} is closed, queue policy opens a new ticket"
            ticket, by = None, "new_ticket"
        else:
            rejected = True
            reason += "; the ticket is closed and the queue rejects replies (stored, not reopened)"

    # Filter rules (mailgw/filters/): classification, priority, routing; may drop the mail.
    decision, trace = run_filters(ctx.pipeline, mail, row, queue.name, ticket)
    if drop_message(session, row, decision, trace):
        row.state, row.processed_at, row.error = "done", now(), None
        return
    new_ticket = ticket is None
    if new_ticket:
        queue = settings.queue(decision.queue) or queue

    stamp = now()
    if ticket is None:
        values = dict(
            title=_clean(mail.subject, 1000) or "(no subject)", queue=queue.name, state="new",
            priority=settings.priority.default, customer=_clean(sender, 320),
            created_at=stamp, updated_at=stamp,
        )
        batch = batch_of(session)
        if batch is not None:  # the worker's batch: its id first, one INSERT (mailgw/batch.py)
            # Made as the ORM makes a loaded instance (no event per attribute): add_ticket
            # puts it in the session as if loaded anyway.
            values["id"] = ticket_id = batch.take(session, "tickets")
            values["number"] = format_number(settings.ticket_numbers, ticket_id, stamp)
            ticket = m.new_object(m.Ticket, values)
            batch.add_ticket(session, ticket)
        else:
            ticket = m.Ticket(**values)
            session.add(ticket)
            session.flush()
            ticket.number = format_number(settings.ticket_numbers, ticket.id, stamp)
        _event(session, "ticket_created", row, ticket, queue=queue.name, number=ticket.number)
    elif not rejected:
        old = ticket.state
        if ticket.state in ("closed", "pending") and not auto:
            ticket.state, ticket.closed_at = "open", None
            # A pending time (and #pending … close) was about the state the customer ended.
            ticket.pending_until = ticket.pending_action = None
            _event(session, "state_changed", row, ticket, old=old, new="open",
                   reason="customer follow-up")
        ticket.updated_at = stamp

    article = _store_article(session, row, ticket, mail, sender, by, reason, auto, cls)
    _event(session, "article_received", row, ticket, article, source=row.source,
           threaded_by=by, reason=reason, automatic=auto)
    apply_decision(session, settings, row, ticket, article, decision, trace, new=new_ticket)
    ticket_events.article_added(session, settings, ticket, article, new_ticket=new_ticket,
                                at=stamp)

    ticket_queue = settings.queue(ticket.queue) or queue
    why_not = (
        f"the message is automatic: {auto}" if auto
        else "the queue does not send auto responses" if not ticket_queue.auto_response
        else f"filter rule {decision.set_by.get('auto_response')!r} suppresses it"
        if decision.auto_response is False
        else None
    )
    recipient = ack_recipient(mail, sender)
    if why_not is None and not _ADDRESS.fullmatch(recipient):
        why_not = f"no valid address to answer ({recipient or 'none'})"
    if why_not is None and unanswerable(recipient):
        why_not = f"the reply address {recipient} does not take replies"
    if why_not is None:
        why_not = loops.limit_reason(session, settings.loop_protection, recipient, ticket.id)
        if why_not:
            _event(session, "rate_limit_hit", row, ticket, article, to=recipient, reason=why_not)
    if why_not:
        _event(session, "auto_response_suppressed", row, ticket, article, reason=why_not)
    else:
        # A reply to a closed ticket the queue does not reopen gets a notice saying so (OTRS's
        # "auto reject"), so the customer knows to write a new request.
        template = ("reject_closed" if rejected else
                    decision.auto_response if isinstance(decision.auto_response, str) else
                    "ack_new" if by == "new_ticket" else "ack_followup")
        _queue_ack(session, row, ctx, ticket, ticket_queue, article, mail, recipient, template,
                   reopened)
    # Tell the agents (docs/agent-mail.md); nothing to do without agents.
    notify_agents(session, settings, ctx.renderer, row, ticket, article, mail,
                  new_ticket=new_ticket, at=stamp)

    row.state, row.processed_at = "done", stamp
    row.ticket_id, row.article_id, row.error = ticket.id, article.id, None


def sender_of(mail: ParsedMail, row: m.Inbound) -> str:
    """Who the message is from: From:, else the envelope sender."""
    return mail.from_addr or (row.mail_from or "").lower()


def ack_recipient(mail: ParsedMail, sender: str) -> str:
    """Where an acknowledgement would go: the first Reply-To, else the sender."""
    return (mail.reply_to[:1] or [sender])[0] if sender else ""


def _find_ticket(session: Session, mail: ParsedMail, settings: Settings,
                 sender: str) -> ThreadMatch:
    """``find_ticket``. In the worker's batch its look-ups are answered from the batch's
    ``ThreadIndex`` (asked once for the batch) and its own rows in memory, without flushing
    them; without an index, without flushing when the batch's rows cannot change the
    answer: no id the message refers to is one of the batch's articles, and its subject
    names no ticket (a new one, or one whose senders the batch adds to). Otherwise the
    look-up flushes, as any query does."""
    cfg = settings.ticket_numbers
    batch = batch_of(session)
    if batch is not None and batch.threads is not None:
        with session.no_autoflush:
            return find_ticket(session, mail, cfg, sender, batch)
    if batch is None or (batch.tickets or batch.articles) and (
            not batch.message_ids.isdisjoint(mail.in_reply_to)
            or not batch.message_ids.isdisjoint(mail.references)
            or subject_pattern(cfg).search(mail.subject or "")):
        return find_ticket(session, mail, cfg, sender)
    with session.no_autoflush:
        return find_ticket(session, mail, cfg, sender)


def _thread_root(session: Session, ticket: m.Ticket) -> str | None:
    """``thread_root``; in the worker's batch from its ``ThreadIndex`` when it knows the
    ticket (stored tickets the batch's messages lead to, and the batch's new ones)."""
    batch = batch_of(session)
    index = batch.threads if batch is not None else None
    if index is None or (ticket.id not in index.tickets and ticket.id not in batch.new_tickets):
        return thread_root(session, ticket)
    stored = index.roots.get(ticket.id)
    mine = batch.first_message_id(ticket.id)
    if mine is not None and (stored is None or mine[0] < stored[0]):
        return mine[1]
    return stored[1] if stored else None


def _store_article(session: Session, row: m.Inbound, ticket: m.Ticket, mail: ParsedMail,
                   sender: str, by: str, reason: str, auto: str | None,
                   cls: Classification | None = None) -> m.Article:
    parts = parts_of(session, row, mail)
    article = m.new_object(m.Article, dict(
        ticket_id=ticket.id, inbound_id=row.id, direction="in", sender_type="customer",
        from_addr=_clean(sender, 320), from_name=_clean(mail.from_name, 500),
        to_addrs=_clean(", ".join(mail.to)), cc_addrs=_clean(", ".join(mail.cc)),
        subject=_clean(mail.subject), message_id=clip_id(mail.message_id),
        in_reply_to=_clean(" ".join(mail.in_reply_to)) or None,
        references=_clean(" ".join(mail.references)) or None,
        body_text=_clean(mail.text), body_html=None, has_html=bool(mail.raw_html),
        threaded_by=by, thread_reason=_clean(reason), is_automatic=auto is not None,
        automatic_reason=auto, created_at=now(),
        mail_class=cls.kind if cls is not None else None,
        visible_text=_clean(parts.visible), signature_text=_clean(parts.signature) or None,
        quoted_text=_clean(parts.quoted) or None,
        # Its server default given here: the ORM would read it back (RETURNING), one INSERT
        # per article instead of one for the batch's.
        internal=False,
    ))
    session.add(article)
    batch = batch_of(session)
    flushed = False
    for att in mail.attachments:
        values = {
            "article_id": article.id, "filename": _clean(att.filename, 500) or None,
            "content_type": _clean(att.content_type, 255), "disposition": att.disposition[:16],
            "content_id": _clean(att.content_id, 500) or None, "size": len(att.data),
            "data": att.data,
        }
        # In the worker's batch, attachments of small mail are inserted with the batch's
        # rows at its end (the parsed mail is held until then anyway; a large message's is
        # let go of as soon as it is stored: mailgw/worker.py _forget_large).
        if batch is not None and (row.size or 0) < SMALL_MAIL and batch.attachment(
                session, values, BATCH_ATTACHMENTS):
            continue
        if not flushed:
            # The attachments' rows name the article: it must be in the store before them.
            session.flush()
            flushed = True
        # One INSERT each, not ORM objects flushed together: the driver binds a copy of the
        # data and the database builds its record from it, so one attachment's copies are
        # in memory at a time rather than every attachment's (issue 8, memory).
        values["article_id"] = article.id
        session.execute(insert(m.Attachment), values)
    if article.id is None:
        session.flush()
    return article


def _queue_ack(session: Session, row: m.Inbound, ctx: Context, ticket: m.Ticket, queue: Queue,
               article: m.Article, mail: ParsedMail, recipient: str, template: str,
               reopened: bool) -> None:
    cfg = ctx.settings.ticket_numbers
    tag = f"[{cfg.hook}{ticket.number}]"
    # Templates see plain values, not ORM objects: their variables are a documented contract.
    rendered = ctx.renderer.render(template, {
        "ticket": {"number": ticket.number, "title": ticket.title, "queue": ticket.queue,
                   "state": ticket.state, "priority": ticket.priority},
        "article": {"subject": article.subject, "from_addr": article.from_addr,
                    "from_name": article.from_name, "text": article.body_text},
        "customer": ticket.customer, "tag": tag,
        "queue": {"name": queue.name, "address": queue.from_address}, "reopened": reopened,
    })
    signer = signer_for(ctx.settings)
    message_id = signer.message_id(ticket.id)  # signed: recognised if it ever comes back
    # RFC 5322 3.6.4: the parent's References plus the parent's id. The ticket's first message
    # leads, so clients keep the whole ticket in one thread even when the customer's mail
    # referred to it only by the number in the subject.
    # A ticket opened by this very message has it as its first (no query needed).
    root = article.message_id if template == "ack_new" else _thread_root(session, ticket)
    chain = mail.references + ([mail.message_id] if mail.message_id else [])
    references = list(dict.fromkeys(([root] if root else []) + chain[-19:]))
    subject = tag_subject(cfg, ticket.number or "", rendered.subject)
    raw = build_message(
        from_addr=queue.from_address, from_name=queue.sender_name, to=[recipient],
        subject=subject, body=rendered.body, message_id=message_id,
        in_reply_to=mail.message_id, references=references,
        extra_headers={
            # RFC 3834: automatic responses say so, and ask others not to answer them.
            "Auto-Submitted": "auto-replied",
            "X-Auto-Response-Suppress": "All",
            "Precedence": "bulk",
            ctx.settings.loop_header: queue.from_address,
            "X-Mailgw-Ticket": ticket.number or "",
        },
    )
    values = dict(
        ticket_id=ticket.id, direction="out", sender_type="system",
        from_addr=queue.from_address, from_name=queue.sender_name or "",
        to_addrs=_clean(recipient),
        subject=subject, message_id=message_id, in_reply_to=mail.message_id,
        references=" ".join(references) or None, body_text=rendered.body,
        threaded_by="auto_response", thread_reason=f"acknowledgement ({template})",
        is_automatic=True, automatic_reason="our acknowledgement", delivery_state="queued",
        created_at=now(),
    )
    batch = batch_of(session)
    if batch is not None:  # the worker's batch: a row inserted at its end (mailgw/batch.py)
        out_id = batch.out_article(session, **values)
    else:
        out = m.Article(**values)
        session.add(out)
        session.flush()
        out_id = out.id
    stamp = now()
    # VERP: a bounce to this envelope sender names this article (docs/machine-mail.md).
    envelope_from = (signer.verp_address(out_id, queue.from_address) if signer.verp
                     else queue.from_address)
    loops.record(session, recipient, ticket.id)
    outbox = dict(ticket_id=ticket.id, article_id=out_id, mail_from=envelope_from,
                  rcpt_tos=[recipient], message_id=message_id, raw=raw, state="pending",
                  attempts=0, next_attempt_at=stamp, created_at=stamp)
    batch = batch_of(session)
    if batch is not None:
        batch.outbox_row(session, **outbox)
    else:
        session.add(m.Outbox(**outbox))
    _event(session, "auto_response_queued", row, ticket, out_id, template=template, to=recipient)
