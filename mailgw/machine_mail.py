"""Machine mail in the worker: bounces, delays, complaints and our own mail coming back.

Called by ``mailgw.process`` once the message is classified, before any queue or ticket is
chosen. Such mail never opens a ticket. It is attached to the ticket whose outgoing mail it
refers to, and trusted only when it does refer to one of ours:

1. the envelope recipient is a VERP address of ours with a valid HMAC token
   (``bounces+TOKEN@…``, ``mailgw.outbound.verp``): it names the outgoing article;
2. else the bounce quotes the Message-ID of an outgoing article of ours (in the returned
   original, quoted headers, In-Reply-To or References).

A trusted bounce is stored as an automatic article on that ticket and marks the outgoing
article ``delivery_state = failed`` with the reason; a delay only records it. An untrusted
one (backscatter from spam that forged our address, a bounce of mail we never sent) is
recorded as an event on the inbound message and nothing else: no ticket, no article, no
answer. Our own mail coming back (``own_loop``) is recorded the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgw.batch import batch_of
from mailgw.mail.classify import Classification, Ours
from mailgw.outbound.verp import signer_for
from mailgw.queue import now
from mailgw.settings import LoopProtection, Settings, per_settings
from mailgw.store import models as m
from mailgw.types import ParsedMail

__all__ = ["handle_machine_mail", "ours_for"]

_REPORTS = ("bounce", "delay", "feedback_report")


@per_settings
def ours_for(settings: Settings) -> Ours:
    """What identifies our own mail, built once per settings object."""
    signer = signer_for(settings)
    addresses = {a for q in settings.queues for a in q.addresses}
    addresses |= {q.from_address.lower() for q in settings.queues}
    return Ours(addresses=frozenset(addresses), loop_header=settings.loop_header,
                is_our_message_id=signer.is_our_message_id, verp_article=signer.verp_article)


def _summary(cls: Classification) -> dict:
    report = cls.bounce
    return {
        "class": cls.kind, "evidence": list(cls.evidence[:6]),
        "failed": [r.as_dict() for r in report.recipients[:20]] if report else [],
        "detector": report.detector if report else None,
        "original_message_ids": list(report.original_message_ids[:5]) if report else [],
    }


def _target(session: Session, cls: Classification) -> tuple[m.Article | None, str]:
    if cls.verp_article_id is not None:
        article = session.get(m.Article, cls.verp_article_id)
        if article is not None and article.direction == "out":
            return article, "VERP return path"
    if cls.kind in _REPORTS and cls.bounce is not None:
        for mid in cls.bounce.original_message_ids[:20]:
            article = session.scalars(
                select(m.Article).where(m.Article.message_id == mid, m.Article.direction == "out")
                .order_by(m.Article.id.desc()).limit(1)).first()
            if article is not None:
                return article, f"original Message-ID {mid}"
    return None, ""


def _hold(session: Session, addresses: list[str], kind: str, reason: str, days: float,
          at: datetime, article_id: int) -> list[str]:
    """Hold automatic mail to ``addresses`` for ``days`` (a later hold replaces an earlier
    one: the newest evidence counts). Returns the addresses held."""
    if days <= 0 or not addresses:
        return []
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    until = at + timedelta(days=days)
    batch = batch_of(session)
    for address in addresses:
        if batch is not None:  # the batch's later messages must see it (its cached holds)
            batch.loops.held(address, until, reason[:2000])
        stmt = insert(m.AddressHold).values(address=address, kind=kind, reason=reason[:2000],
                                            until=until, created_at=at, article_id=article_id)
        session.execute(stmt.on_conflict_do_update(
            index_elements=["address"],
            set_={"kind": kind, "reason": reason[:2000], "until": until, "created_at": at,
                  "article_id": article_id}))
    return addresses


def _sent_to(target: m.Article) -> set[str]:
    return {a.strip().lower() for a in (target.to_addrs or "").split(",") if a.strip()}


def handle_machine_mail(session: Session, row: m.Inbound, mail: ParsedMail,
                        cls: Classification, store_article: Callable[..., m.Article],
                        event: Callable[..., None],
                        loop: LoopProtection | None = None) -> bool:
    """Handle reports and returning mail of ours; False leaves the message to the normal path."""
    if cls.kind not in (*_REPORTS, "own_loop") and cls.verp_article_id is None:
        return False
    target, how = _target(session, cls)
    stamp = now()
    if target is None:
        if cls.kind == "own_loop":
            event(session, "own_mail_returned", row, None, **_summary(cls))
        elif cls.kind in _REPORTS:
            # Not about a message we sent: backscatter or a stranger's bounce. Kept raw in the
            # inbound row, recorded, and otherwise ignored.
            event(session, "bounce_untrusted", row, None, **_summary(cls),
                  reason="refers to no message we sent")
        else:
            return False  # an unknown VERP article: let the normal path decide
        row.state, row.processed_at, row.error = "done", stamp, None
        return True

    ticket = session.get(m.Ticket, target.ticket_id)
    sender = mail.from_addr or (row.mail_from or "").lower()
    reason = f"{cls.kind} of our article {target.id} ({how})"
    article = store_article(session, row, ticket, mail, sender, cls.kind, reason,
                            cls.reason or cls.kind, cls)
    article.sender_type = "system"
    summary = _summary(cls)
    if cls.kind == "bounce":
        failed = cls.bounce.recipients if cls.bounce else ()
        detail = "; ".join(f"{r.address} {r.status or ''} {r.diagnostic or ''}".strip()
                           for r in failed[:5]) or "delivery failed (no details in the bounce)"
        target.delivery_state = "failed"
        target.delivery_error = detail[:2000]
        event(session, "delivery_failed", row, ticket, target, by=how, bounce_article=article.id,
              **summary)
        # A permanent failure for an address we did send this mail to: no automatic mail to
        # it for a while (a bounce naming other addresses holds nothing).
        permanent = sorted({r.address.lower() for r in failed if r.permanent} & _sent_to(target))
        if loop is not None and permanent:
            held = _hold(session, permanent, "bounce", f"our mail bounced: {detail}",
                         loop.bounce_hold_days, stamp, target.id)
            if held:
                event(session, "address_held", row, ticket, target, addresses=held,
                      kind="bounce", days=loop.bounce_hold_days)
    elif cls.kind == "feedback_report" and loop is not None:
        # An abuse complaint (ARF) about mail we sent: its recipient does not want it.
        held = _hold(session, sorted(_sent_to(target)), "complaint",
                     f"abuse complaint about our article {target.id}",
                     loop.complaint_hold_days, stamp, target.id)
        if held:
            event(session, "address_held", row, ticket, target, addresses=held,
                  kind="complaint", days=loop.complaint_hold_days)
    elif cls.kind == "delay":
        event(session, "delivery_delayed", row, ticket, target, by=how, **summary)
    event(session, "machine_mail_attached", row, ticket, article, by=how, target_article=target.id,
          **summary)
    row.state, row.processed_at = "done", stamp
    row.ticket_id, row.article_id, row.error = ticket.id, article.id, None
    return True
