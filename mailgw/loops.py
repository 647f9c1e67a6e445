"""Loop protection: how many automatic mails one address and one ticket may get.

Classification already keeps us from answering machine mail (``mailgw.mail.classify``), and
our own automatic mail says it is automatic (RFC 3834), so two well-behaved systems do not
loop. The rate limit is the backstop for the ones that are not: an autoresponder that
strips every header, a forwarding chain. OTRS's default is 40 automatic mails a day per
address (``PostmasterMaxEmails``); we count per recipient address and per ticket in a
sliding window (``loop_protection`` in config/mailgw.yaml). Each count is one indexed
COUNT on the ``auto_replies`` table, written in the same transaction as the mail; in the
worker's batch (``mailgw.batch``) the counts are kept in memory for the batch and the
store is asked once per recipient and ticket. An address held after a permanent bounce or
an abuse complaint (``address_holds``, mailgw.machine_mail) gets no automatic mail at all
until the hold ends.
"""

from __future__ import annotations

from datetime import UTC, timedelta

from sqlalchemy import Engine, delete, func, select
from sqlalchemy.orm import Session

from mailgw.batch import batch_of
from mailgw.queue import now
from mailgw.settings import LoopProtection
from mailgw.store import models as m

__all__ = ["limit_reason", "prune", "record"]


def limit_reason(session: Session, cfg: LoopProtection, recipient: str,
                 ticket_id: int | None) -> str | None:
    """Why one more automatic mail to ``recipient`` on this ticket would break a limit."""
    recipient = recipient.strip().lower()
    window = f"{cfg.window_hours:g} h"
    batch = batch_of(session)
    counts = batch.loops if batch is not None and batch.loops.window_hours == cfg.window_hours \
        else None
    # An address our mail bounced from, or that complained (mailgw.machine_mail).
    if counts is not None:
        hold = counts.hold_for(session, recipient)
    else:
        found = session.execute(select(m.AddressHold.until, m.AddressHold.reason).where(
            m.AddressHold.address == recipient, m.AddressHold.until > now())).first()
        hold = (found[0], found[1]) if found else None
    if hold is not None:
        until = hold[0] if hold[0].tzinfo else hold[0].replace(tzinfo=UTC)
        return (f"automatic mail to {recipient} is held until "
                f"{until.astimezone(UTC):%Y-%m-%d %H:%M} UTC: {hold[1]}")
    if counts is not None:
        # The worker's batch: the store's counts before it plus its own (mailgw/batch.py).
        sent = counts.for_recipient(session, recipient)
    else:
        since = now() - timedelta(hours=cfg.window_hours)
        sent = session.scalar(select(func.count()).select_from(m.AutoReply).where(
            m.AutoReply.recipient == recipient, m.AutoReply.created_at >= since)) or 0
    if sent >= cfg.max_per_sender:
        return (f"rate limit: {sent} automatic mails to {recipient} in {window} "
                f"(loop_protection.max_per_sender {cfg.max_per_sender})")
    if ticket_id is not None:
        if counts is not None:
            sent = counts.for_ticket(session, ticket_id)
        else:
            sent = session.scalar(select(func.count()).select_from(m.AutoReply).where(
                m.AutoReply.ticket_id == ticket_id, m.AutoReply.created_at >= since)) or 0
        if sent >= cfg.max_per_ticket:
            return (f"rate limit: {sent} automatic mails on this ticket in {window} "
                    f"(loop_protection.max_per_ticket {cfg.max_per_ticket})")
    return None


def record(session: Session, recipient: str, ticket_id: int | None) -> None:
    batch = batch_of(session)
    if batch is not None:
        batch.auto_reply(session, recipient.strip().lower()[:320], ticket_id, now())
        return
    session.add(m.AutoReply(recipient=recipient.strip().lower()[:320], ticket_id=ticket_id,
                            created_at=now()))


def prune(engine: Engine, cfg: LoopProtection) -> int:
    """Delete counter rows older than the window (the scheduler runs this); returns how many."""
    with Session(engine) as s, s.begin():
        result = s.execute(delete(m.AutoReply).where(
            m.AutoReply.created_at < now() - timedelta(hours=cfg.window_hours)))
        s.execute(delete(m.AddressHold).where(m.AddressHold.until <= now()))
    return result.rowcount or 0
