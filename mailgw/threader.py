"""Find the ticket a message belongs to, and say why.

Order, each step stronger than the next:
1. a Message-ID we already hold (ours, or an earlier message of the customer's own) in
   ``In-Reply-To`` or ``References``, by an indexed lookup;
2. the ticket number in the subject, accepted only when the sender is already on that ticket,
   so a stranger who quotes a number cannot write into someone else's ticket;
3. otherwise a new ticket.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailgw.mail.ids import id_fits
from mailgw.numbers import subject_pattern
from mailgw.settings import TicketNumbers
from mailgw.store.models import Article, Inbound, Ticket
from mailgw.types import ParsedMail, aware

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
    return [r for r in refs if r and id_fits(r)][:MAX_REFERENCES]


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
    # Message-ID -> inbound ids of messages with that id still in the queue (pending: not
    # claimed, claimed by another worker, or held back), outside the batch; asked before the
    # articles, so a message seen here still pending cannot have been missed by both
    # (``held_back``). Only asked for the worker's batch (``in_flight`` given to prefetch).
    in_flight: dict[str, list[int]] = field(default_factory=dict)
    # The referred Message-IDs that any inbound row carries (whatever its state).
    received: set[str] = field(default_factory=set)


@cache
def _prefetch_statements(pg: bool) -> dict[str, Any]:
    """prefetch's statements, built once: building one (and its cache key) cost more than
    running it (~0.1 ms each, several a batch: bench/RESULTS.md, issue 8 session 7). The
    lists are ``mailgw.batch.in_list``s (PostgreSQL: ``= ANY(array)``, one text)."""
    from mailgw.batch import in_list

    a = Article.__table__
    tickets = select(Ticket).where(in_list(Ticket.id, "ids", pg)).order_by(Ticket.id)
    return {
        "inbound": select(Inbound.id, Inbound.message_id, Inbound.state)
        .where(in_list(Inbound.message_id, "refs", pg)),
        "articles": select(Article.message_id, Article.ticket_id)
        .where(in_list(Article.message_id, "refs", pg))
        .order_by(Article.id.desc()),
        "numbers": select(Ticket.id, Ticket.number)
        .where(in_list(Ticket.number, "numbers", pg)),
        "tickets": tickets,
        "tickets_locked": tickets.with_for_update(key_share=True),
        "roots": select(a.c.id, a.c.ticket_id, a.c.message_id).where(a.c.id.in_(
            select(func.min(a.c.id)).where(in_list(a.c.ticket_id, "ids", pg),
                                           a.c.message_id.is_not(None))
            .group_by(a.c.ticket_id))),
    }


def prefetch(session: Session, mails: Iterable[ParsedMail], cfg: TicketNumbers, *,
             lock: bool, in_flight: Collection[int] | None = None) -> ThreadIndex:
    """Ask the store once for what threading ``mails`` needs (see ``ThreadIndex``). ``lock``
    (PostgreSQL): the tickets are loaded ``FOR NO KEY UPDATE`` in id order, so two workers
    whose batches touch the same tickets take their row locks in the same order; the second
    waits for the first's commit instead of deadlocking with it (bench/RESULTS.md, issue 8
    session 5), and then reads the tickets as the first left them.

    ``in_flight`` (the worker: the batch's inbound ids): also which of the referred
    Message-IDs belong to messages still in the queue outside the batch (``held_back``).
    Asked before the articles: a message committed in between is then found on its ticket,
    one still pending was seen pending (PostgreSQL reads each statement's own snapshot)."""
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
    from mailgw.batch import is_pg

    q = _prefetch_statements(is_pg(session))
    if refs and in_flight is not None:
        # Every state, filtered here: a condition on state would let the planner read the
        # pending rows instead of this index, and a backlog can be large (a queue of 1,000
        # made it 0.1 ms a message in profile_worker).
        batch_ids = set(in_flight)
        for iid, mid, state in session.execute(q["inbound"], {"refs": sorted(refs)}):
            index.received.add(mid)
            if state == "pending" and iid not in batch_ids:
                index.in_flight.setdefault(mid, []).append(iid)
    if refs:
        for mid, tid in session.execute(q["articles"], {"refs": sorted(refs)}):
            if mid not in index.refs:  # newest article first
                index.refs[mid] = tid
                ids.add(tid)
    if numbers:
        index.numbers = dict.fromkeys(numbers)
        for tid, number in session.execute(q["numbers"], {"numbers": sorted(numbers)}):
            index.numbers[number] = tid
            ids.add(tid)
    if not ids:
        return index
    # The tickets, then those they were merged into (a merged ticket hands its mail on),
    # until none is missing: one statement unless the batch leads to a merged ticket.
    todo = ids
    while todo:
        loaded = list(session.scalars(q["tickets_locked" if lock else "tickets"],
                                      {"ids": sorted(todo)}))
        index.loaded += loaded
        index.tickets.update(ticket.id for ticket in loaded)
        todo = {t.merged_into for t in loaded if t.merged_into} - index.tickets
    for aid, tid, mid in session.connection().execute(q["roots"],
                                                      {"ids": sorted(index.tickets)}):
        index.roots[tid] = (aid, mid)
    return index


# A reply held back for its original (``held_back``): at most HOLD_MAX from its first hold,
# retried after HOLD_DELAY, growing with the time held up to HOLD_DELAY_MAX.
HOLD_MAX = timedelta(seconds=10)
HOLD_DELAY = timedelta(milliseconds=50)
HOLD_DELAY_MAX = timedelta(seconds=1)
# A reply that refers to nothing the store holds, no article and no inbound row, waits until
# it is ``orphan_wait`` old (worker.orphan_reply_wait): its original may have been sent at
# the same moment on another connection and be committed a moment later (held_back).


def held_back(index: ThreadIndex,
              batch: Sequence[tuple[int, datetime | None, datetime | None, ParsedMail | None]],
              at: datetime, orphan_wait: timedelta = timedelta(0)
              ) -> tuple[dict[int, timedelta], dict[int, str]]:
    """The messages of a worker's batch to hold back: ``(inbound id, held_since,
    received_at, parsed mail)`` -> ``({inbound id: delay}, {inbound id: note})``.

    A message is held when none of the Message-IDs it refers to is on a stored article or is
    one of the batch's messages, but one is the Message-ID of a message still in the queue
    outside the batch (``ThreadIndex.in_flight``: claimed by another worker whose
    transaction has not committed, not claimed yet, or held itself), or of a message of the
    batch that is held: stored now, the reply would open a ticket of its own. It is given
    back unprocessed (no attempt counted) and claimed again after the returned delay, by
    when its original has most likely been stored. Bounded: a message first held
    ``HOLD_MAX`` ago is processed as it is (a stuck, slow or never-finished original does
    not hold it for ever; two messages that refer to each other are held at most that long,
    and once claimed into one batch together they are stored there, ``parents_first``); the
    note says why it opened a ticket. An original already quarantined or done is not in the
    queue: no hold.

    A reply none of whose Message-IDs the store has at all (no article, no inbound row,
    ``ThreadIndex.received``: an original sent at the same moment over another connection
    may not be committed yet) is held until it is ``orphan_wait`` old, looked at again after
    as long as it has waited so far. A reference that has an inbound row in any other state
    holds nobody: the row was read before the articles, so an original stored since is found
    on its ticket; a message that names itself, one of the batch that did not parse, an
    agent's answer stored on its ticket under our own Message-ID, or a quarantined original
    make no ticket to wait for."""
    delays: dict[int, timedelta] = {}
    notes: dict[int, str] = {}
    mids = {iid: mail.message_id for iid, _, _, mail in batch
            if mail is not None and mail.message_id}
    changed = True
    while changed:  # a reply to a message of the batch that is held is held too
        changed = False
        own = {mid: iid for iid, mid in mids.items() if iid not in delays}
        for iid, held_since, received_at, mail in batch:
            if mail is None or iid in delays or iid in notes:
                continue
            refs = message_refs(mail)
            if not refs or any(r in index.refs or own.get(r, iid) != iid for r in refs):
                continue
            waiting = sorted({w for r in refs for w in index.in_flight.get(r, ())}
                             | {o for o, mid in mids.items() if o in delays and mid in refs})
            if not waiting:
                received_at = aware(received_at)
                if (received_at is not None and at - received_at < orphan_wait
                        and index.received.isdisjoint(refs)):
                    # Looked at again after as long as it has waited so far (50 ms, then
                    # doubling), not once at the end of the wait: an original a moment
                    # behind it (another connection) is then found within ~2x its delay,
                    # for a few more looks (claim and parse, ~1 ms each) over the wait.
                    age = at - received_at
                    delays[iid] = max(HOLD_DELAY, min(age, received_at + orphan_wait - at))
                    changed = True
                continue
            held_since = aware(held_since)
            held = at - held_since if held_since is not None else timedelta(0)
            if held >= HOLD_MAX:
                notes[iid] = (f"inbound {', '.join(map(str, waiting))} with the message it "
                              f"refers to was still in the queue after "
                              f"{held.total_seconds():.0f} s")
                continue
            delays[iid] = min(HOLD_DELAY_MAX, max(HOLD_DELAY, held / 2))
            changed = True
    return delays, notes


def parents_first(items: Sequence[tuple[int, ParsedMail | None]]) -> list[int]:
    """The order to store a batch in: by inbound id, except that a message referring to
    another message of the batch comes after it (a reply received before its original,
    claimed into the same batch, then threads into the original's ticket instead of opening
    one). Of messages that refer to each other in a cycle, one goes first."""
    by_mid: dict[str, int] = {}
    for iid, mail in items:
        if mail is not None and mail.message_id:
            by_mid.setdefault(mail.message_id, iid)
    if not by_mid:
        return [iid for iid, _ in items]
    parents: dict[int, list[int]] = {}
    for iid, mail in items:
        if mail is not None and (mail.in_reply_to or mail.references):
            found = [by_mid[r] for r in message_refs(mail) if r in by_mid and by_mid[r] != iid]
            if found:
                parents[iid] = found
    if not parents:
        return [iid for iid, _ in items]
    order: list[int] = []
    state: dict[int, int] = {}  # 1: being placed, 2: placed

    def place(iid: int) -> None:
        stack = [(iid, iter(parents.get(iid, ())))]
        state[iid] = 1
        while stack:
            node, todo = stack[-1]
            for parent in todo:
                if parent not in state:  # 1 (a cycle): leave it where it is
                    state[parent] = 1
                    stack.append((parent, iter(parents.get(parent, ()))))
                    break
            else:
                stack.pop()
                state[node] = 2
                order.append(node)

    for iid, _ in items:
        if iid not in state:
            place(iid)
    return order


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
