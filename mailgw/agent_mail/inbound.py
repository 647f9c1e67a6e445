"""Mail from agents: answers to customers, internal notes and commands (docs/agent-mail.md).

``handle_agent_mail`` is called by ``mailgw.process`` right after machine mail (bounces and
our own mail coming back are never agent mail), in the worker's transaction. It takes a
message sent to a signed reply address (``+t.``/``+c.``, ``mailgw.agent_mail.tokens``) in
the envelope recipients or, for mail read by IMAP, in To/Cc. It also looks at mail whose
``From:`` is an agent's address without such an address: a forgery, or an agent writing
to the queue like a customer; ``agent_mail.forged`` says which it is taken for.

Steps for a token address:

1. verify the token (key, HMAC, age), the ticket (exists, not merged) and that the agent
   still serves its queue;
2. automatic mail (an agent's out-of-office answering a notification) is kept as an
   internal automatic article: nothing is sent, no command runs;
3. ``From:`` must be one of the agent's addresses, and ``require_auth`` met;
4. the quoted notification is cut (``mailgw.mail.reply``); the commands at the top are
   parsed and executed all or nothing (``mailgw.agent_commands``);
5. ``+c.`` or ``#note``: an internal article; else an agent article sent to the customer
   from the queue address, threaded into the customer's conversation.

Any refusal sends nothing to the customer. A mail that fails a check of steps 1 or 3 is
quarantined (raw kept, ``mailgw quarantine list`` shows why; replay after fixing the
config), never attached to a ticket; refused commands leave the mail as an internal article.
The agent, when known from the token or by the ``From:`` address, is told why by mail at
their configured address (not at the ``From:``, which may be forged).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgw import loops, ticket_events
from mailgw.agent_mail.notify import queue_agent_mail, thread_root
from mailgw.agent_mail.tokens import Token, TokenError, find_token_address, verify_token
from mailgw.agent_mail.trust import agent_for_address, auth_problem
from mailgw.mail.classify import Classification, unanswerable
from mailgw.mail.ids import clip_id
from mailgw.mail.reply import ReplyParts, reply_parts
from mailgw.numbers import tag_subject
from mailgw.outbound.render import Renderer, build_message
from mailgw.outbound.verp import signer_for
from mailgw.queue import now
from mailgw.settings import Agent, Queue, Settings
from mailgw.store import models as m
from mailgw.types import ParsedMail

__all__ = ["handle_agent_mail"]

_ADDRESS = re.compile(r"[^@\s<>,;:]+@[^@\s<>,;:]+\.[^@\s<>,;:]+")
_COMMAND_LINE = re.compile(r"^\s*#[A-Za-z]+\b")
_REPLY_PREFIX = re.compile(r"^\s*(?:re|aw|sv|antw)\s*:", re.IGNORECASE)


def _clean(text: str | None, limit: int | None = None) -> str:
    text = (text or "").replace("\x00", "")
    return text[:limit] if limit else text


def _event(session: Session, type_: str, row: m.Inbound, ticket: m.Ticket | None,
           article: m.Article | None = None, **data: Any) -> None:
    session.add(m.Event(type=type_, created_at=now(), data=data, inbound_id=row.id,
                        ticket_id=ticket.id if ticket else None,
                        article_id=article.id if article else None))


def handle_agent_mail(session: Session, row: m.Inbound, mail: ParsedMail, cls: Classification,
                      settings: Settings, renderer: Renderer) -> bool:
    """Handle agent mail; False leaves the message to the customer path. Costs nothing
    when agent mail is off, and a substring test plus one dict look-up otherwise."""
    if not settings.agents or not settings.agent_mail.enabled:
        return False
    found = (find_token_address(settings, row.rcpt_tos)
             or find_token_address(settings, [*mail.to, *mail.cc]))
    if found is None:
        agent = agent_for_address(settings, mail.from_addr)
        if agent is None:
            return False
        reason = (f"From: {mail.from_addr} is an address of agent {agent.name}, and the mail "
                  "was not sent to a signed reply address")
        return _forged(session, row, mail, cls, settings, renderer, agent, None, reason)
    kind, token, address_queue = found
    at = now()
    try:
        tok = verify_token(settings, kind, token, at)
    except TokenError as exc:
        # The agent is told at their configured address, when the From names one.
        return _untrusted(session, row, mail, cls, settings, renderer, address_queue,
                          agent_for_address(settings, mail.from_addr), None, str(exc), at)
    agent = tok.agent
    ticket = session.get(m.Ticket, tok.ticket_id)
    problem = None
    if ticket is None:
        problem = f"ticket id {tok.ticket_id} does not exist"
    elif ticket.state == "merged":
        into = getattr(ticket, "merged_into", None)
        target = session.get(m.Ticket, into) if into else None
        problem = (f"the ticket is merged into {settings.ticket_numbers.hook}"
                   f"{target.number if target else '?'}; reply to a notification of that ticket")
    elif ticket.queue not in agent.queues:
        problem = f"agent {agent.name} does not serve queue {ticket.queue}, the ticket's queue"
    if problem:
        return _untrusted(session, row, mail, cls, settings, renderer, address_queue, agent,
                          ticket, problem, at)
    assert ticket is not None
    queue = settings.queue(ticket.queue) or address_queue

    if mail.from_addr not in agent.addresses:
        if (mail.from_addr and ticket.customer and mail.from_addr == ticket.customer.lower()
                and agent_for_address(settings, mail.from_addr) is None):
            # The ticket's own customer writing to the signed address: an agent Cc'd them on
            # an answer and they replied to all. Their follow-up, not a forgery; it gets no
            # agent's power (the customer path threads it by its references).
            _event(session, "token_address_used_by_customer", row, ticket, agent=agent.name,
                   from_addr=mail.from_addr)
            return False
        reason = (f"mail to the signed reply address of agent {agent.name} came from "
                  f"{mail.from_addr or 'no From address'}, not from one of the agent's addresses")
        return _forged(session, row, mail, cls, settings, renderer, agent, ticket, reason)
    # Trust first, also for automatic mail: a token alone must not put text on a ticket
    # in an agent's name.
    problem = auth_problem(settings, mail)
    if problem:
        return _untrusted(session, row, mail, cls, settings, renderer, queue, agent, ticket,
                          problem, at)
    if cls.automatic:
        # An out-of-office or other automatic answer to a notification: kept for the record,
        # never sent on, never read for commands.
        parts = reply_parts(mail.text, mail.raw_html)
        article = _agent_article(session, row, ticket, mail, agent, parts, tok, internal=True,
                                 automatic=cls.reason or cls.kind, cls=cls, at=at)
        _event(session, "agent_auto_reply_stored", row, ticket, article, agent=agent.name,
               reason=cls.reason)
        ticket_events.article_added(session, settings, ticket, article, new_ticket=False, at=at)
        _done(row, ticket, article, at)
        return True

    return _trusted(session, row, mail, settings, renderer, queue, agent, ticket, tok, at)


# --- trusted mail ---------------------------------------------------------------------------


@dataclass
class _Parsed:
    """What mailgw.agent_commands.Parsed gives, when that module is not installed."""

    commands: list[Any]
    rest: str
    note: bool
    errors: list[Any] = field(default_factory=list)
    signature: str = ""


def _parse_commands(text: str) -> tuple[Any, Any]:
    """(parsed, the agent_commands module or None)."""
    try:
        from mailgw import agent_commands
    except ImportError:  # commands by mail not installed: only #note is understood
        lines = (text or "").replace("\r\n", "\n").split("\n")
        i = next((j for j, x in enumerate(lines) if x.strip()), len(lines))
        if i < len(lines) and lines[i].strip().lower() == "#note":
            return _Parsed([], "\n".join(lines[i + 1:]).strip("\n"), True), None
        commands = [x.strip() for x in lines[i:i + 1] if _COMMAND_LINE.match(x)]
        return _Parsed(commands, text, False), None
    return agent_commands.parse_commands(text), agent_commands


def _trusted(session: Session, row: m.Inbound, mail: ParsedMail, settings: Settings,
             renderer: Renderer, queue: Queue, agent: Agent, ticket: m.Ticket, tok: Token,
             at: datetime) -> bool:
    if mail.message_id and _already_done(session, ticket, agent, mail.message_id):
        # The same mail again (the agent's client sent it twice, a relay added a header, a
        # replay): answered or noted once is enough; nothing is sent or changed again.
        _event(session, "agent_mail_duplicate", row, ticket, agent=agent.name,
               agent_message_id=mail.message_id)
        row.state, row.processed_at, row.ticket_id, row.error = "done", at, ticket.id, None
        return True
    parts = reply_parts(mail.text, mail.raw_html)
    parsed, commands_module = _parse_commands(parts.visible)
    note = tok.kind == "c" or parsed.note
    text = parsed.rest.strip("\n")
    reasons: list[str] = []
    recipient = ""
    if not note:
        text, removed = _scrub(text, agent)
        if removed:
            _event(session, "agent_reply_scrubbed", row, ticket, agent=agent.name,
                   lines_removed=removed)
        attached = [a.content_type for a in mail.attachments if _is_mail_part(a.content_type)]
        if attached:
            reasons.append(
                f"a mail is attached ({', '.join(attached)}: a forwarded or attached original); "
                "it is not sent to customers because it carries your address and the ticket's "
                "signed reply addresses. Attach files only, and send the answer again.")
    # An answer has text or a file attached (inline images alone are a signature's logo).
    answer = not note and bool(text.strip() or any(
        a.disposition == "attachment" for a in mail.attachments))
    if answer:
        # It must be deliverable before any command changes the ticket.
        recipient, why = _customer_recipient(session, settings, ticket)
        if why:
            reasons.append(why)
    if not reasons and parsed.commands:
        if commands_module is None:
            reasons.append(f"commands by mail are not available here ({parsed.commands[0]})")
        else:  # all or nothing: a refusal changes nothing
            results = commands_module.execute(session, settings, ticket, agent,
                                              parsed.commands, at=at)
            if commands_module.refused(results):
                reasons += commands_module.refusal_text(results).splitlines()
            else:  # after #merge the answer and the note belong on the merge target
                ticket = commands_module.resolve_merged(session, ticket)
    if reasons:
        article = _agent_article(session, row, ticket, mail, agent, parts, tok, internal=True,
                                 text=parts.visible, at=at,
                                 reason="refused: " + "; ".join(reasons)[:900])
        _event(session, "agent_mail_refused", row, ticket, article, agent=agent.name,
               reasons=reasons, trusted=True)
        ticket_events.article_added(session, settings, ticket, article, new_ticket=False, at=at)
        _tell_agent(session, settings, renderer, queue, agent, ticket, mail, reasons, at)
        _done(row, ticket, article, at)
        return True

    if not answer:
        # A note (+c. or #note), or commands alone: kept on the ticket, not sent.
        body = text if text.strip() else "\n".join(
            getattr(c, "raw", str(c)) for c in parsed.commands)
        article = _agent_article(session, row, ticket, mail, agent, parts, tok, internal=True,
                                 text=body, at=at,
                                 reason="internal note" if note else "commands only")
        _event(session, "agent_note_added" if note else "agent_commands_only", row, ticket,
               article, agent=agent.name, via="comment address" if tok.kind == "c" else
               "#note" if parsed.note else "commands", commands=len(parsed.commands),
               agent_message_id=mail.message_id)
        ticket_events.article_added(session, settings, ticket, article, new_ticket=False, at=at)
        _done(row, ticket, article, at)
        return True

    article = _send_to_customer(session, row, mail, settings, queue, agent, ticket, tok, parts,
                                text, recipient, at)
    if ticket.state == "new":
        # Answered: the ticket is being worked on (OTRS: "open" after the first answer).
        ticket.state = "open"
        _event(session, "state_changed", row, ticket, article, old="new", new="open",
               reason=f"agent {agent.name} answered by mail")
        ticket_events.ticket_changed(session, settings, ticket, {"state": ("new", "open")},
                                     at=at, reason=f"agent {agent.name} answered by mail")
    ticket.updated_at = at
    ticket_events.article_added(session, settings, ticket, article, new_ticket=False, at=at)
    _done(row, ticket, article, at)
    return True


def _agents_addresses(settings: Settings) -> list[str]:
    return [a for agent in settings.agents for a in agent.addresses]


# A signed reply or comment address of ours (mailgw.agent_mail.tokens): never sent to customers.
_TOKEN_ADDRESS = re.compile(r"[A-Za-z0-9._%-]+\+[tc]\.[A-Za-z0-9]+@[A-Za-z0-9.-]+")


def _is_mail_part(content_type: str) -> bool:
    ct = (content_type or "").lower()
    return ct.startswith("message/") or ct == "text/rfc822-headers"


def _scrub(text: str, agent: Agent) -> tuple[str, int]:
    """The answer without the lines that name one of the agent's own addresses or one of our
    signed addresses (an unmarked signature, a quote the splitter did not recognise); the
    number of lines removed. The agent's address never reaches the customer."""
    own = [a.lower() for a in agent.addresses]
    kept, removed = [], 0
    for line in text.split("\n"):
        low = line.lower()
        if any(a in low for a in own) or _TOKEN_ADDRESS.search(line):
            removed += 1
            continue
        kept.append(line)
    return "\n".join(kept), removed


# What an agent's mail did once it was trusted; its Message-ID is kept in the event.
_AGENT_DONE = ("agent_reply_sent", "agent_note_added", "agent_commands_only")


def _already_done(session: Session, ticket: m.Ticket, agent: Agent, message_id: str) -> bool:
    """Whether this agent's mail with this Message-ID was already acted on for the ticket
    (a few events per ticket, read by the ticket's index)."""
    for data in session.scalars(select(m.Event.data).where(
            m.Event.ticket_id == ticket.id, m.Event.type.in_(_AGENT_DONE))):
        if (data or {}).get("agent_message_id") == message_id and (
                data or {}).get("agent") == agent.name:
            return True
    return False


def _customer_recipient(session: Session, settings: Settings,
                        ticket: m.Ticket) -> tuple[str, str | None]:
    """Where the customer is answered: the Reply-To of their last mail, else the ticket's
    customer; and why not, when that is no address to write to. Mail from an agent's
    address that came in as customer mail (no token) is never the one answered."""
    last = session.scalars(
        select(m.Article).where(m.Article.ticket_id == ticket.id, m.Article.direction == "in",
                                m.Article.sender_type == "customer",
                                m.Article.from_addr.not_in(_agents_addresses(settings)))
        .order_by(m.Article.is_automatic, m.Article.id.desc()).limit(1)).first()
    recipient = ticket.customer
    if last is not None and last.inbound_id is not None:
        raw = session.scalar(select(m.InboundRaw.raw)
                             .where(m.InboundRaw.inbound_id == last.inbound_id))
        if raw:
            headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
            reply_to = [a for _, a in getaddresses(headers.get_all("Reply-To", [])) if a]
            if reply_to and _ADDRESS.fullmatch(reply_to[0]):
                recipient = reply_to[0].lower()
    if not recipient or not _ADDRESS.fullmatch(recipient):
        return recipient, f"the ticket's customer has no address to write to ({recipient or 'none'})"
    if unanswerable(recipient):
        return recipient, f"the customer's address {recipient} does not take mail"
    return recipient, None


def _send_to_customer(session: Session, row: m.Inbound, mail: ParsedMail, settings: Settings,
                      queue: Queue, agent: Agent, ticket: m.Ticket, tok: Token,
                      parts: ReplyParts, text: str, recipient: str, at: datetime) -> m.Article:
    last = session.scalars(
        select(m.Article).where(m.Article.ticket_id == ticket.id, m.Article.direction == "in",
                                m.Article.sender_type == "customer",
                                m.Article.from_addr.not_in(_agents_addresses(settings)),
                                m.Article.message_id.is_not(None))
        .order_by(m.Article.id.desc()).limit(1)).first()
    in_reply_to = last.message_id if last is not None else None
    chain = ((last.references or "").split() if last is not None else []) + (
        [in_reply_to] if in_reply_to else [])
    root = thread_root(session, ticket)
    references = list(dict.fromkeys(([root] if root else []) + chain[-19:]))
    cfg = settings.ticket_numbers
    title = ticket.title if _REPLY_PREFIX.match(ticket.title) else f"Re: {ticket.title}"
    subject = tag_subject(cfg, ticket.number or "", title)
    signer = signer_for(settings)
    message_id = signer.message_id(ticket.id)
    body = text.rstrip() + "\n"
    # Only what the customer should see: the queue's From, no Reply-To, no Cc, no trace of
    # the agent's address (the attachments are the agent's own files).
    raw = build_message(
        from_addr=queue.from_address, from_name=queue.sender_name, to=[recipient],
        subject=subject, body=body, message_id=message_id, in_reply_to=in_reply_to,
        references=references, extra_headers={"X-Mailgw-Ticket": ticket.number or ""},
        attachments=mail.attachments)
    article = _agent_article(session, row, ticket, mail, agent, parts, tok, internal=False,
                             text=body, at=at, reason="answer to the customer",
                             outgoing=(queue, recipient, subject, message_id, in_reply_to,
                                       references))
    envelope_from = (signer.verp_address(article.id, queue.from_address) if signer.verp
                     else queue.from_address)
    session.add(m.Outbox(
        ticket_id=ticket.id, article_id=article.id, mail_from=envelope_from,
        rcpt_tos=[recipient], message_id=message_id, raw=raw, state="pending", attempts=0,
        next_attempt_at=at, created_at=at))
    _event(session, "agent_reply_sent", row, ticket, article, agent=agent.name, to=recipient,
           attachments=len(mail.attachments), key=tok.key_id, agent_message_id=mail.message_id)
    return article


# --- refusals and forgeries ----------------------------------------------------------------


def _forged(session: Session, row: m.Inbound, mail: ParsedMail, cls: Classification,
            settings: Settings, renderer: Renderer, agent: Agent, ticket: m.Ticket | None,
            reason: str) -> bool:
    """An agent's From without the agent's token, or the token without the agent's From."""
    policy = settings.agent_mail.forged
    _event(session, "agent_forgery_suspected", row, ticket, agent=agent.name,
           from_addr=mail.from_addr, reason=reason,
           action="processed as customer mail" if policy == "customer" else "quarantined")
    if policy == "customer":
        return False
    at = now()
    queue = (settings.queue(ticket.queue) if ticket is not None else None) or _any_queue(
        settings, row)
    return _untrusted(session, row, mail, cls, settings, renderer, queue, agent, ticket,
                      reason, at, logged=True)


def _any_queue(settings: Settings, row: m.Inbound) -> Queue:
    for rcpt in row.rcpt_tos:
        q = settings.queue_for_recipient(rcpt)
        if q is not None:
            return q
    return settings.queues[0]


def _untrusted(session: Session, row: m.Inbound, mail: ParsedMail, cls: Classification,
               settings: Settings, renderer: Renderer, queue: Queue, agent: Agent | None,
               ticket: m.Ticket | None, reason: str, at: datetime, *,
               logged: bool = False) -> bool:
    """Refuse mail that cannot be trusted: quarantined (kept raw, replayable), never on a
    ticket; the agent, when known, is told at their configured address. Automatic mail is
    only recorded (no quarantine, no answer)."""
    if not logged:
        _event(session, "agent_mail_refused", row, ticket, agent=agent.name if agent else None,
               from_addr=mail.from_addr, reasons=[reason], trusted=False)
    if cls.automatic:
        row.state, row.processed_at, row.error = "done", at, None
        return True
    if agent is not None and agent.addresses:
        _tell_agent(session, settings, renderer, queue, agent, ticket, mail, [reason], at)
    row.state, row.processed_at, row.claimed_until = "quarantined", at, None
    row.error = f"agent mail refused: {reason}"[:4000]
    _event(session, "quarantined", row, None, reason=row.error)
    return True


def _tell_agent(session: Session, settings: Settings, renderer: Renderer, queue: Queue,
                agent: Agent, ticket: m.Ticket | None, mail: ParsedMail, reasons: list[str],
                at: datetime) -> None:
    # Anyone can make us write to an agent by sending junk in their name: the loop
    # protection's limits apply to these notices as to any automatic mail.
    to = agent.addresses[0]
    ticket_id = ticket.id if ticket is not None else None
    limit = loops.limit_reason(session, settings.loop_protection, to, ticket_id)
    if limit:
        session.add(m.Event(type="rate_limit_hit", created_at=at, ticket_id=ticket_id,
                            data={"to": to, "reason": limit, "notice": "agent_refused"}))
        return
    loops.record(session, to, ticket_id)
    tag = f"[{settings.ticket_numbers.hook}{ticket.number}]" if ticket is not None else ""
    rendered = renderer.render("agent_refused", {
        "agent": {"name": agent.name},
        "ticket": {"number": ticket.number if ticket else "", "title": ticket.title if ticket
                   else "", "queue": ticket.queue if ticket else "",
                   "state": ticket.state if ticket else ""},
        "tag": tag, "subject": mail.subject, "reasons": reasons,
    })
    queue_agent_mail(session, settings, ticket=ticket, queue=queue, agent=agent,
                     subject=rendered.subject, body=rendered.body,
                     from_name=queue.sender_name or queue.name, reply_to=None,
                     in_reply_to=mail.message_id, references=[mail.message_id] if
                     mail.message_id else [], auto_submitted="auto-replied",
                     why=f"refusal told to {agent.name}", at=at)


# --- articles -------------------------------------------------------------------------------


def _agent_article(session: Session, row: m.Inbound, ticket: m.Ticket, mail: ParsedMail,
                   agent: Agent, parts: ReplyParts, tok: Token, *, internal: bool, at: datetime,
                   text: str | None = None, automatic: str | None = None,
                   cls: Classification | None = None, reason: str = "",
                   outgoing: tuple | None = None) -> m.Article:
    how = (f"signed {'comment' if tok.kind == 'c' else 'reply'} address of agent {agent.name} "
           f"(key {tok.key_id}, issued {tok.issued.isoformat()})")
    article = m.Article(
        ticket_id=ticket.id, inbound_id=row.id, sender_type="agent", agent=agent.name,
        internal=internal, direction="in", from_addr=_clean(mail.from_addr, 320),
        from_name=_clean(mail.from_name, 500), to_addrs=_clean(", ".join(mail.to)),
        cc_addrs=_clean(", ".join(mail.cc)), subject=_clean(mail.subject),
        message_id=clip_id(mail.message_id),
        in_reply_to=_clean(" ".join(mail.in_reply_to)) or None,
        references=_clean(" ".join(mail.references)) or None,
        body_text=_clean(text if text is not None else mail.text),
        body_html=None, has_html=outgoing is None and bool(mail.raw_html),  # decision 32
        threaded_by="agent_token", thread_reason=_clean(f"{how}; {reason}" if reason else how),
        is_automatic=automatic is not None, automatic_reason=automatic, created_at=at,
        mail_class=cls.kind if cls is not None else None,
        visible_text=_clean(text if text is not None else parts.visible),
        signature_text=_clean(parts.signature) or None,
        quoted_text=_clean(parts.quoted) or None,
    )
    if outgoing is not None:
        # What went to the customer: the queue's identity, our Message-ID and thread.
        queue, recipient, subject, message_id, in_reply_to, references = outgoing
        article.direction, article.delivery_state = "out", "queued"
        article.from_addr, article.from_name = queue.from_address, queue.sender_name or ""
        article.to_addrs, article.cc_addrs, article.subject = recipient, "", subject
        article.message_id, article.in_reply_to = message_id, in_reply_to
        article.references = " ".join(references) or None
    session.add(article)
    session.flush()
    for att in mail.attachments:
        session.add(m.Attachment(
            article_id=article.id, filename=_clean(att.filename, 500) or None,
            content_type=_clean(att.content_type, 255), disposition=att.disposition[:16],
            content_id=_clean(att.content_id, 500) or None, size=len(att.data), data=att.data))
    return article


def _done(row: m.Inbound, ticket: m.Ticket, article: m.Article, at: datetime) -> None:
    row.state, row.processed_at = "done", at
    row.ticket_id, row.article_id, row.error = ticket.id, article.id, None
