"""Find the ticket a message belongs to, and say why.

Order, each step stronger than the next:
1. a Message-ID we already hold (ours, or an earlier message of the customer's own) in
   ``In-Reply-To`` or ``References``, by an indexed lookup;
2. the ticket number in the subject, accepted only when the sender is already on that ticket,
   so a stranger who quotes a number cannot write into someone else's ticket;
3. otherwise a new ticket.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgw.numbers import subject_pattern
from mailgw.settings import TicketNumbers
from mailgw.store.models import Article, Ticket
from mailgw.types import ParsedMail

# A References header can list hundreds of ids; the newest ones are the useful ones.
MAX_REFERENCES = 50


@dataclass(frozen=True)
class ThreadMatch:
    ticket: Ticket | None
    by: str  # "in_reply_to", "references", "subject_number" or "new_ticket"
    reason: str


def find_ticket(session: Session, mail: ParsedMail, cfg: TicketNumbers,
                sender: str | None = None) -> ThreadMatch:
    """``sender`` is who the message is from (From:, else the envelope sender)."""
    sender = sender if sender is not None else mail.from_addr
    # Ids come from strangers: no NUL (PostgreSQL refuses it), no absurd lengths.
    refs = list(dict.fromkeys(mail.in_reply_to + list(reversed(mail.references))))
    refs = [r for r in refs if r and "\x00" not in r and len(r) <= 998][:MAX_REFERENCES]
    notes = []
    if refs:
        rows = session.execute(
            select(Article.message_id, Article.ticket_id).where(Article.message_id.in_(refs))
            .order_by(Article.id.desc())
        ).all()
        found = {}
        for mid, tid in rows:  # newest article first: an id on two tickets means the newer
            found.setdefault(mid, tid)
        for ref in refs:
            if ref in found:
                ticket = session.get(Ticket, found[ref])
                by = "in_reply_to" if ref in mail.in_reply_to else "references"
                header = "In-Reply-To" if by == "in_reply_to" else "References"
                return _follow_merge(session, ThreadMatch(
                    ticket, by, f"{header} <{ref}> is on ticket {ticket.number}"))
        notes.append(f"none of {len(refs)} referenced Message-ID(s) is known")

    for m in subject_pattern(cfg).finditer(mail.subject or ""):
        number = m.group(1)
        ticket = session.scalars(select(Ticket).where(Ticket.number == number)).first()
        if ticket is None:
            notes.append(f"subject names {cfg.hook}{number}, which does not exist")
            continue
        if _sender_on_ticket(session, ticket, sender):
            return _follow_merge(session, ThreadMatch(
                ticket,
                "subject_number",
                f"subject names {cfg.hook}{number} and {sender} is on that ticket",
            ))
        notes.append(
            f"subject names {cfg.hook}{number} but {sender or 'the sender'} is not on"
            " that ticket"
        )
    return ThreadMatch(None, "new_ticket", "; ".join(notes) or "no reference to a known ticket")


def _sender_on_ticket(session: Session, ticket: Ticket, sender: str) -> bool:
    if not sender:
        return False
    if ticket.customer == sender:
        return True
    if getattr(ticket, "merged_into", None):
        # A merged ticket's articles are on its target now: who wrote there counts too.
        into = session.get(Ticket, ticket.merged_into)
        if into is not None and into.id != ticket.id and _sender_on_ticket(session, into, sender):
            return True
    hit = session.scalar(
        select(Article.id)
        # Only mail received on the ticket counts: our own outgoing articles are "from" the
        # queue address, which anyone can forge.
        .where(Article.ticket_id == ticket.id, Article.from_addr == sender,
               Article.direction == "in")
        .limit(1)
    )
    return hit is not None


def _follow_merge(session: Session, match: ThreadMatch) -> ThreadMatch:
    """A merged ticket (agent command #merge) hands its mail on to the ticket it was merged
    into; its articles moved there, but its number still appears in subjects."""
    ticket, seen = match.ticket, set()
    while ticket is not None and getattr(ticket, "merged_into", None) and ticket.id not in seen:
        seen.add(ticket.id)
        into = session.get(Ticket, ticket.merged_into)
        if into is None:
            break
        match = ThreadMatch(into, match.by,
                            f"{match.reason}, which was merged into ticket {into.number}")
        ticket = into
    return match
