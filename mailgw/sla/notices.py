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
from datetime import datetime, timedelta
from typing import Any

from jinja2 import TemplateError, TemplateNotFound
from sqlalchemy import Table, func, insert, select
from sqlalchemy.orm import Session

from mailgw.calendar import Calendar
from mailgw.numbers import subject_tag, tag_subject
from mailgw.outbound.render import Renderer, build_message
from mailgw.outbound.verp import signer_for
from mailgw.settings import Settings, Sla, SlaLevel
from mailgw.store import models as m
from mailgw.types import aware

# Template names a level uses unless it names its own (`template:`).
WARNING_TEMPLATE, BREACH_TEMPLATE = "sla_warning", "sla_breach"
# A notice sent this much after its level was reached says when it really was (deferred to
# working hours, or the sweep was not running).
_DELAYED = timedelta(minutes=1)
# Rows per executemany of articles and outbox rows. psycopg pipelines an executemany; at 300
# articles in one, the INSERT took ~210 ms instead of ~10 in most processes (PostgreSQL over
# loopback TCP; a stall, not work: bench/RESULTS.md "second pass"). 100 at a time did not.
_CHUNK = 100


@dataclass
class Prepared:
    """A rendered notice, ready to be stored (``store``) with the rest of its batch."""

    ticket_id: int
    to: list[str]
    template: str
    message_id: str
    from_address: str
    raw: bytes
    article: dict[str, Any]  # the outgoing article's columns, without its id
    article_id: int | None = None
    outbox_id: int | None = None




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
    """``dt`` in the calendar's zone as ``2026-11-27 14:30 CET`` (``strftime("%Y-%m-%d
    %H:%M %Z")``, written out: four of these per notice)."""
    if dt is None:
        return None
    t = cal.local(aware(dt))  # type: ignore[arg-type]
    return f"{t.year}-{t.month:02d}-{t.day:02d} {t.hour:02d}:{t.minute:02d} {t.tzname() or ''}"


def template_for(level: SlaLevel) -> str:
    if level.template:
        return level.template
    return BREACH_TEMPLATE if level.percent >= 100 else WARNING_TEMPLATE


def prepare(settings: Settings, renderer: Renderer, *, ticket: m.Ticket, clock: m.SlaClock,
            sla: Sla, cal: Calendar, level_index: int, level: SlaLevel, to: list[str],
            reached_at: datetime, at: datetime, root: str | None,
            actions: dict[str, Any]) -> Prepared:
    """Render a level's notice to ``to`` (raises jinja2's TemplateError on a bad template).
    ``reached_at``: when the level was really reached; ``at``: now (later when the notice
    was deferred to working hours); ``actions``: what the level did, for the text; ``cal``:
    the zone the times are shown in."""
    kind = "breach" if level.percent >= 100 else "warning"
    template = template_for(level)
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
    message_id = signer_for(settings).message_id(ticket.id)
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
    article = dict(
        ticket_id=ticket.id, direction="out", sender_type="system",
        from_addr=queue.from_address, from_name=queue.sender_name or "",
        to_addrs=", ".join(to), cc_addrs="", subject=subject, message_id=message_id,
        in_reply_to=root, references=" ".join(references) or None, body_text=rendered.body,
        threaded_by="sla_notice",
        thread_reason=f"SLA {sla.name} {clock.target} {kind} at {level.percent}% ({template})",
        is_automatic=True, automatic_reason="SLA escalation notice", delivery_state="queued",
        created_at=at,
    )
    return Prepared(ticket.id, to, template, message_id, queue.from_address, raw, article)


def number(session: Session, notices: list[Prepared]) -> None:
    """Take the ids of the notices' articles and outbox rows (``allocate_ids``, one
    statement) and set ``article_id`` and ``outbox_id`` on each, before ``store``.

    The ids are taken first and the rows inserted with them, without RETURNING: SQLite
    cannot return the ids of a multi-row INSERT in order, so SQLAlchemy would send it a
    statement per row, and each outbox row needs its article's id for VERP."""
    if not notices:
        return
    article_ids, outbox_ids = allocate_ids(
        session, (m.Article.__table__, m.Outbox.__table__), len(notices))
    for n, article_id, outbox_id in zip(notices, article_ids, outbox_ids, strict=True):
        n.article_id, n.outbox_id = article_id, outbox_id


def store(session: Session, settings: Settings, notices: list[Prepared], at: datetime) -> None:
    """Insert the numbered (``number``) notices' articles and outbox rows, a statement each
    for the whole batch."""
    if not notices:
        return
    signer = signer_for(settings)
    articles, rows = [], []
    for n in notices:
        article_id = n.article_id
        assert article_id is not None, "number() the notices first"
        articles.append({"id": article_id, **n.article})
        # VERP: a bounce to this envelope sender names this article (docs/machine-mail.md).
        envelope_from = (signer.verp_address(article_id, n.from_address) if signer.verp
                         else n.from_address)
        rows.append(dict(id=n.outbox_id, ticket_id=n.ticket_id, article_id=article_id,
                         mail_from=envelope_from, rcpt_tos=n.to, message_id=n.message_id,
                         raw=n.raw, state="pending", attempts=0, next_attempt_at=at,
                         created_at=at))
    for i in range(0, len(notices), _CHUNK):  # ids given: never RETURNING (inline)
        session.execute(insert(m.Article.__table__).inline(), articles[i:i + _CHUNK])
        session.execute(insert(m.Outbox.__table__).inline(), rows[i:i + _CHUNK])


def allocate_ids(session: Session, tables: tuple[Table, ...], count: int) -> list[list[int]]:
    """``count`` new primary keys of each of ``tables``, ascending, for rows this transaction
    inserts (one statement for all the tables).

    PostgreSQL: from the columns' sequences, as a plain INSERT would take them. SQLite: the
    ids after the largest, which is what SQLite gives rows without an explicit id (the
    tables have no AUTOINCREMENT); safe because a writer holds the database's one write
    lock from BEGIN IMMEDIATE (mailgw/store/db.py) to its commit."""
    if count <= 0:
        return [[] for _ in tables]
    if session.get_bind().dialect.name == "postgresql":
        q = select(*(func.nextval(func.pg_get_serial_sequence(t.name, "id")) for t in tables)
                   ).select_from(func.generate_series(1, count))
        return [sorted(column) for column in zip(*session.execute(q), strict=True)]
    q = select(*(select(func.max(t.c.id)).scalar_subquery() for t in tables))
    tops = session.execute(q).one()
    return [list(range((top or 0) + 1, (top or 0) + 1 + count)) for top in tops]


def check_templates(settings: Settings, renderer: Renderer) -> list[str]:
    """Compile every template an SLA level would send (for ``mailgw config check``);
    problems as ``templates/NAME.j2[:line]: reason (slas[i] NAME level P%)``."""
    errors = []
    seen: set[str] = set()
    for i, sla in enumerate(settings.slas):
        for level in sla.levels:
            name = template_for(level)
            if name in seen:
                continue
            seen.add(name)
            where = f"(slas[{i}] {sla.name} level {level.percent}%)"
            try:
                tmpl = renderer.env.get_template(f"{name}.j2")
            except TemplateNotFound:
                errors.append(f"templates/{name}.j2: not found {where}")
                continue
            except TemplateError as exc:
                line = getattr(exc, "lineno", None)
                errors.append(f"templates/{name}.j2" + (f":{line}" if line else "")
                              + f": {exc.message or exc} {where}")
                continue
            if "subject" not in tmpl.blocks or "body" not in tmpl.blocks:
                errors.append(f"templates/{name}.j2: needs a 'subject' and a 'body' block {where}")
    return errors
