"""Find the ticket a message belongs to, and say why.

Order, each step stronger than the next:
1. a Message-ID we already hold (ours, or an earlier message of the customer's own) in
   ``In-Reply-To`` or ``References``, by an indexed lookup;
2. the ticket number in the subject, accepted only when the sender is already on that ticket,
   so a stranger who quotes a number cannot write into someone else's ticket;
3. otherwise a new ticket.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailgw.numbers import subject_pattern
from mailgw.settings import TicketNumbers
from mailgw.store.models import Article, Ticket
from mailgw.types import ParsedMail

if TYPE_CHECKING:
    from mailgw.batch import Batch

# A References header can list hundreds of ids; the newest ones are the useful ones.
MAX_REFERENCES = 50


@dataclass(frozen=True)
class ThreadMatch:
    ticket: Ticket | None
    by: str  # "in_reply_to", "references", "subject_number" or "new_ticket"
    reason: str


def message_refs(mail: ParsedMail) -> list[str]:
    """The Message-IDs a message refers to, in the order they are tried."""
    # Ids come from strangers: no NUL (PostgreSQL refuses it), no absurd lengths.
    refs = list(dict.fromkeys(mail.in_reply_to + list(reversed(mail.references))))
    return [r for r in refs if r and "\x00" not in r and len(r) <= 998][:MAX_REFERENCES]


@dataclass
class ThreadIndex:
    """What threading asks the store about a worker's batch, asked once for the whole batch
    before its first message (``prefetch``): the stored articles' Message-IDs the batch's
    messages refer to, the tickets its subjects name, the tickets either leads to (loaded
    into the session, on PostgreSQL locked in id order), and each such ticket's first
    Message-ID (the acknowledgement's thread root). ``find_ticket`` adds the batch's own
    articles and tickets from memory, so nothing is flushed for a look-up.

    Valid while the batch only adds rows: an UPDATE or DELETE of articles or tickets through
    the session (an agent's #merge moves articles) drops it (``mailgw.batch``) and the
    look-ups go to the store again, as before."""

    refs: dict[str, int] = field(default_factory=dict)  # Message-ID -> newest stored ticket id
    asked_refs: set[str] = field(default_factory=set)
    numbers: dict[str, int | None] = field(default_factory=dict)  # number -> id, None: none
    roots: dict[int, tuple[int, str]] = field(default_factory=dict)  # ticket -> first (id, mid)
    tickets: set[int] = field(default_factory=set)  # loaded (and locked) stored tickets
    # The loaded objects: the session's identity map holds them weakly only.
    loaded: list[Ticket] = field(default_factory=list)


def prefetch(session: Session, mails: Iterable[ParsedMail], cfg: TicketNumbers, *,
             lock: bool) -> ThreadIndex:
    """Ask the store once for what threading ``mails`` needs (see ``ThreadIndex``). ``lock``
    (PostgreSQL): the tickets are loaded ``FOR NO KEY UPDATE`` in id order, so two workers
    whose batches touch the same tickets take their row locks in the same order; the second
    waits for the first's commit instead of deadlocking with it (bench/RESULTS.md, issue 8
    session 5), and then reads the tickets as the first left them."""
    index = ThreadIndex()
    refs: dict[str, None] = {}
    numbers: dict[str, None] = {}
    pattern = subject_pattern(cfg)
    for mail in mails:
        refs.update(dict.fromkeys(message_refs(mail)))
        for m in pattern.finditer(mail.subject or ""):
            numbers[m.group(1)] = None
    index.asked_refs = set(refs)
    ids: set[int] = set()
    if refs:
        for mid, tid in session.execute(
                select(Article.message_id, Article.ticket_id)
                .where(Article.message_id.in_(sorted(refs))).order_by(Article.id.desc())):
            if mid not in index.refs:  # newest article first
                index.refs[mid] = tid
                ids.add(tid)
    if numbers:
        index.numbers = dict.fromkeys(numbers)
        for tid, number in session.execute(
                select(Ticket.id, Ticket.number).where(Ticket.number.in_(sorted(numbers)))):
            index.numbers[number] = tid
            ids.add(tid)
    if not ids:
        return index
    # The tickets, then those they were merged into (a merged ticket hands its mail on),
    # until none is missing: one statement unless the batch leads to a merged ticket.
    todo = ids
    while todo:
        q = select(Ticket).where(Ticket.id.in_(sorted(todo))).order_by(Ticket.id)
        if lock:
            q = q.with_for_update(key_share=True)
        loaded = list(session.scalars(q))
        index.loaded += loaded
        index.tickets.update(ticket.id for ticket in loaded)
        todo = {t.merged_into for t in loaded if t.merged_into} - index.tickets
    a = Article.__table__
    first = (select(func.min(a.c.id)).where(a.c.ticket_id.in_(sorted(index.tickets)),
                                            a.c.message_id.is_not(None))
             .group_by(a.c.ticket_id))
    for aid, tid, mid in session.connection().execute(
            select(a.c.id, a.c.ticket_id, a.c.message_id).where(a.c.id.in_(first))):
        index.roots[tid] = (aid, mid)
    return index


def find_ticket(session: Session, mail: ParsedMail, cfg: TicketNumbers,
                sender: str | None = None, batch: Batch | None = None) -> ThreadMatch:
    """``sender`` is who the message is from (From:, else the envelope sender). ``batch``:
    the worker's batch with its ``ThreadIndex``; the look-ups it covers are answered from
    it and the batch's own rows, the others from the store without flushing."""
    sender = sender if sender is not None else mail.from_addr
    index = batch.threads if batch is not None else None
    refs = message_refs(mail)
    notes = []
    if refs:
        if index is not None and index.asked_refs.issuperset(refs):
            found = {}
            for ref in refs:
                own = batch.own_message_ids.get(ref)  # type: ignore[union-attr]
                if own is not None:  # the batch's articles are the newest
                    found[ref] = own.ticket_id
                elif ref in index.refs:
                    found[ref] = index.refs[ref]
        else:
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
        if index is not None and number in index.numbers:
            ticket = batch.new_numbers.get(number)  # type: ignore[union-attr]
            if ticket is None and index.numbers[number] is not None:
                ticket = session.get(Ticket, index.numbers[number])
        else:
            ticket = session.scalars(select(Ticket).where(Ticket.number == number)).first()
        if ticket is None:
            notes.append(f"subject names {cfg.hook}{number}, which does not exist")
            continue
        if _sender_on_ticket(session, ticket, sender, batch):
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


def _sender_on_ticket(session: Session, ticket: Ticket, sender: str,
                      batch: Batch | None = None) -> bool:
    if not sender:
        return False
    if ticket.customer == sender:
        return True
    if getattr(ticket, "merged_into", None):
        # A merged ticket's articles are on its target now: who wrote there counts too.
        into = session.get(Ticket, ticket.merged_into)
        if into is not None and into.id != ticket.id and _sender_on_ticket(
                session, into, sender, batch):
            return True
    if batch is not None and batch.threads is not None:
        # The batch's own articles from memory, the store's without flushing them.
        if any(a.ticket_id == ticket.id and a.from_addr == sender and a.direction == "in"
               for a in batch.articles):
            return True
        with session.no_autoflush:
            return _sender_on_ticket_stored(session, ticket, sender)
    return _sender_on_ticket_stored(session, ticket, sender)


def _sender_on_ticket_stored(session: Session, ticket: Ticket, sender: str) -> bool:
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
