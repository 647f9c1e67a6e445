"""The tables. Raw mail lives in the database, in the same transaction as its queue row.

Keeping the raw bytes in the database (instead of a file plus a row) means one commit, one
fsync, makes a message durable, and no crash can leave a file without its row or a row
without its file. They are in ``inbound_raw``, next to the inbound row, inserted in the same
transaction (docs/architecture.md, decision 35). See docs/decisions.md.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    false,
    text,
)
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


_T = TypeVar("_T")


def new_object(cls: type[_T], values: dict[str, Any]) -> _T:
    """A new (transient) instance of a mapped class with ``values``, made as the ORM makes
    the instances it loads: no event per attribute, the values put in the instance's dict,
    which is what its INSERT reads (issue 8: an Article through its constructor cost ~45 us,
    this ~3 us). Later changes are tracked as usual. Only for columns (no relationships)."""
    obj = cls._sa_class_manager.new_instance()  # type: ignore[attr-defined]
    obj.__dict__.update(values)
    return obj


class Inbound(Base):
    """The durable inbound queue: one row per received message. Its raw bytes are in
    ``inbound_raw`` (``InboundRaw``), written in the same transaction as the row and never
    updated: the worker's claim and "done" UPDATEs rewrite this small row only, not the
    message (docs/architecture.md, decision 35). ``row.raw`` reads them (see ``raw``)."""

    __tablename__ = "inbound"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    received_at: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(16))
    source_ref: Mapped[str | None] = mapped_column(String(500))
    mail_from: Mapped[str | None] = mapped_column(String(998))  # None: unknown, "": "<>"
    rcpt_tos: Mapped[list[str]] = mapped_column(JSON)
    queue: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    # pending -> done | quarantined; quarantined -> pending again on replay.
    state: Mapped[str] = mapped_column(String(16), default="pending")
    # Attempts are counted when a worker claims the row, before it processes it, so a message
    # that crashes or hangs its worker is quarantined after worker.max_attempts claims.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_until: Mapped[datetime | None]  # a worker's lease; expired leases are free
    claimed_by: Mapped[str | None] = mapped_column(String(200))  # "host:pid" of that worker
    error: Mapped[str | None] = mapped_column(Text)
    processed_at: Mapped[datetime | None]
    ticket_id: Mapped[int | None] = mapped_column(BigId)
    article_id: Mapped[int | None] = mapped_column(BigId)
    # The bare Message-ID from the header block, read at intake (mailgw.intake.pipe
    # message_id_of): a reply whose original is still in this queue waits for it (worker.py,
    # docs/architecture.md decision 31). When the worker first held this row back so.
    message_id: Mapped[str | None] = mapped_column(String(998), index=True)
    held_since: Mapped[datetime | None]

    # PostgreSQL creates this table with fillfactor 50 (migration 0020; Table options are not
    # expressible here): the claim's update of a batch stays on the rows' pages (HOT).
    __table_args__ = (
        # Workers claim the oldest pending rows; a partial index keeps that lookup as small as
        # the backlog, however many messages are done.
        Index(
            "ix_inbound_pending",
            "id",
            postgresql_where=text("state = 'pending'"),
            sqlite_where=text("state = 'pending'"),
        ),
        # SQLite's claim plan uses the whole index. PostgreSQL's uses ix_inbound_pending, and
        # an entry per row version (three a message) served only the quarantine list: there
        # the index holds quarantined rows only (migration 0020).
        Index("ix_inbound_state", "state", postgresql_where=text("state = 'quarantined'")),
    )

    # The raw bytes as read or handed over (``keep_raw``); not a mapped attribute.
    _raw_bytes = None  # bytes, or None: not read yet

    @hybrid_property
    def raw(self) -> bytes:
        """The raw message: the bytes the worker read for its batch (``keep_raw``), else read
        from ``inbound_raw`` in the row's session on first use and kept with the row. In a
        query, ``Inbound.raw`` is a correlated subquery on ``inbound_raw`` (for reads that
        want the row's columns with it; the worker reads ``InboundRaw`` directly)."""
        raw = self._raw_bytes
        if raw is None:
            from sqlalchemy import select
            from sqlalchemy.orm import object_session

            session = object_session(self)
            if session is None:
                raise RuntimeError(f"inbound {self.id}: no session to read its raw mail with")
            raw = session.scalar(select(InboundRaw.raw).where(InboundRaw.inbound_id == self.id))
            if raw is None:
                raise LookupError(f"inbound {self.id} has no raw mail (inbound_raw)")
            self._raw_bytes = raw
        return raw

    @raw.inplace.expression
    @classmethod
    def _raw_expression(cls):  # type: ignore[no-untyped-def]
        from sqlalchemy import select

        return (select(InboundRaw.raw).where(InboundRaw.inbound_id == cls.id)
                .scalar_subquery().label("raw"))


def keep_raw(row: Inbound, raw: bytes | None) -> None:
    """Give ``row`` its raw bytes, read already (the worker reads a batch's at once), or let
    go of them (None: read again on next use)."""
    row._raw_bytes = raw


class InboundRaw(Base):
    """The raw bytes of an inbound message, in a table of their own (decision 35): inserted
    with the inbound row, in the same transaction (the intake's durability rule), never
    updated. On SQLite ``inbound_id`` is the rowid (the large-message path writes the blob
    in place through it, ``mailgw.intake.pipe.write_large``); ``raw`` is its one other
    column. On PostgreSQL ``raw`` is compressed with lz4 (migrations 0016, 0019)."""

    __tablename__ = "inbound_raw"
    inbound_id: Mapped[int] = mapped_column(BigId, ForeignKey("inbound.id"), primary_key=True,
                                            autoincrement=False)
    raw: Mapped[bytes] = mapped_column(LargeBinary)


class Ticket(Base):
    __tablename__ = "tickets"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    number: Mapped[str | None] = mapped_column(String(40), unique=True)
    title: Mapped[str] = mapped_column(String(1000))
    queue: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), default="new")  # new/open/pending/closed/merged
    priority: Mapped[int] = mapped_column(Integer, default=3)
    customer: Mapped[str] = mapped_column(String(320), index=True)
    owner: Mapped[str | None] = mapped_column(String(320))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    closed_at: Mapped[datetime | None]
    # Set by filter rules (issue 4): ITIL type (incident / service_request / problem /
    # change), service, category, tags, custom fields, the customer's company, and the
    # urgency and impact the priority was derived from.
    type: Mapped[str | None] = mapped_column(String(32))
    service: Mapped[str | None] = mapped_column(String(200))
    category: Mapped[str | None] = mapped_column(String(200))
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    custom_fields: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    company: Mapped[str | None] = mapped_column(String(320))
    urgency: Mapped[str | None] = mapped_column(String(16))
    impact: Mapped[str | None] = mapped_column(String(16))
    # The SLA definition in force (mailgw/sla, issue 6) and what chose it ("queue support",
    # "rule vip", ...); None: no SLA applies.
    sla: Mapped[str | None] = mapped_column(String(64))
    sla_reason: Mapped[str | None] = mapped_column(Text)
    # Agent commands (issue 7, mailgw/agent_commands.py): when a pending ticket reopens by
    # itself (#pending 3d), and the ticket a merged one (state "merged") was merged into.
    pending_until: Mapped[datetime | None]
    # What happens at pending_until: None reopens the ticket and reminds the owner (OTRS
    # "pending reminder"), "close" closes it (OTRS "pending auto close", #pending 3d close).
    pending_action: Mapped[str | None] = mapped_column(String(16))
    merged_into: Mapped[int | None] = mapped_column(BigId)

    # PostgreSQL creates this table with fillfactor 85 (migration 0010; Table options are not
    # expressible here): a follow-up's update of updated_at stays on the row's page as a HOT
    # update, without entries in the indexes below. An index on a column the worker updates
    # per message would end that (docs/architecture.md, decision 22).
    __table_args__ = (
        # Least-open assignment counts each agent's open tickets.
        Index("ix_tickets_owner_state", "owner", "state"),
        # Reports select the tickets created in a range (mailgw report sla).
        Index("ix_tickets_created_at", "created_at"),
        # The wake-up job each minute reads only tickets that have a reminder time.
        Index("ix_tickets_pending_until", "pending_until",
              postgresql_where=text("pending_until IS NOT NULL"),
              sqlite_where=text("pending_until IS NOT NULL")),
    )


class Article(Base):
    __tablename__ = "articles"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    inbound_id: Mapped[int | None] = mapped_column(BigId)
    direction: Mapped[str] = mapped_column(String(8))  # "in" or "out"
    sender_type: Mapped[str] = mapped_column(String(16))  # customer / system / agent
    from_addr: Mapped[str] = mapped_column(String(320))
    from_name: Mapped[str] = mapped_column(String(500), default="")
    to_addrs: Mapped[str] = mapped_column(Text, default="")
    cc_addrs: Mapped[str] = mapped_column(Text, default="")
    subject: Mapped[str] = mapped_column(Text, default="")
    # Indexed: threading looks up In-Reply-To/References here, at the same cost for any size.
    message_id: Mapped[str | None] = mapped_column(String(998), index=True)
    in_reply_to: Mapped[str | None] = mapped_column(Text)
    references: Mapped[str | None] = mapped_column(Text)
    body_text: Mapped[str] = mapped_column(Text, default="")
    # Sanitised HTML, or NULL: since decision 32 a cache that mailgw.mail.sanitize's
    # article_html fills from the raw mail when the HTML is first needed; ``has_html`` says
    # the message has an HTML body (articles stored before migration 0018 have their HTML in
    # body_html already and has_html false).
    body_html: Mapped[str | None] = mapped_column(Text)
    has_html: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    threaded_by: Mapped[str] = mapped_column(String(32))
    thread_reason: Mapped[str] = mapped_column(Text, default="")
    is_automatic: Mapped[bool] = mapped_column(Boolean, default=False)
    automatic_reason: Mapped[str | None] = mapped_column(Text)
    delivery_state: Mapped[str | None] = mapped_column(String(16))  # outgoing: queued/sent/failed
    created_at: Mapped[datetime]
    # Machine mail (mailgw.mail.classify / reply): the class of an incoming message, its new
    # text apart from the signature and the quoted history (body_text keeps it all), and
    # for outgoing mail why delivery failed (a bounce).
    mail_class: Mapped[str | None] = mapped_column(String(32))
    visible_text: Mapped[str | None] = mapped_column(Text)
    signature_text: Mapped[str | None] = mapped_column(Text)
    quoted_text: Mapped[str | None] = mapped_column(Text)
    delivery_error: Mapped[str | None] = mapped_column(Text)
    # Which filter rules matched this incoming article, which did not, what each changed.
    filter_trace: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Agent mail (issue 7, mailgw/agent_mail): an internal note is never sent to the customer;
    # ``agent`` names the agent who wrote an agent article or note (the token's agent).
    internal: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    agent: Mapped[str | None] = mapped_column(String(320))


class Attachment(Base):
    __tablename__ = "attachments"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    article_id: Mapped[int] = mapped_column(ForeignKey("articles.id"), index=True)
    filename: Mapped[str | None] = mapped_column(String(500))
    content_type: Mapped[str] = mapped_column(String(255))
    disposition: Mapped[str] = mapped_column(String(16))
    content_id: Mapped[str | None] = mapped_column(String(500))
    size: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Event(Base):
    """The event log: every decision about a message or ticket, with its reason."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    ticket_id: Mapped[int | None] = mapped_column(BigId, index=True)
    article_id: Mapped[int | None] = mapped_column(BigId)
    inbound_id: Mapped[int | None] = mapped_column(BigId, index=True)
    type: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime]


class AssignmentCursor(Base):
    """Round robin: the agent who got the last ticket of a queue (locked while choosing)."""

    __tablename__ = "assignment_cursors"
    queue: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_agent: Mapped[str | None] = mapped_column(String(320))
    updated_at: Mapped[datetime]


class Outbox(Base):
    """Outgoing mail, rendered and committed with the decision that caused it."""

    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    ticket_id: Mapped[int | None] = mapped_column(BigId)
    article_id: Mapped[int | None] = mapped_column(BigId)
    mail_from: Mapped[str] = mapped_column(String(998))
    rcpt_tos: Mapped[list[str]] = mapped_column(JSON)
    message_id: Mapped[str] = mapped_column(String(998))
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending/sent/dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    lease_until: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]

    __table_args__ = (
        Index(
            "ix_outbox_due",
            "next_attempt_at",
            postgresql_where=text("state = 'pending'"),
            sqlite_where=text("state = 'pending'"),
        ),
    )


class AddressHold(Base):
    """An address that gets no automatic mail until ``until`` (mailgw.loops): our mail to it
    bounced permanently, or its owner reported our mail as abuse (docs/machine-mail.md)."""

    __tablename__ = "address_holds"
    address: Mapped[str] = mapped_column(String(320), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # bounce | complaint
    reason: Mapped[str] = mapped_column(Text)
    until: Mapped[datetime]
    created_at: Mapped[datetime]
    article_id: Mapped[int | None] = mapped_column(BigId)  # our mail that bounced


class AutoReply(Base):
    """One automatic mail we sent: what the loop protection counts (mailgw.loops)."""

    __tablename__ = "auto_replies"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    recipient: Mapped[str] = mapped_column(String(320))
    ticket_id: Mapped[int | None] = mapped_column(BigId)
    created_at: Mapped[datetime]

    __table_args__ = (
        Index("ix_auto_replies_recipient_created_at", "recipient", "created_at"),
        Index("ix_auto_replies_ticket_id_created_at", "ticket_id", "created_at"),
    )


class SlaClock(Base):
    """One SLA target of one ticket (issue 6): ``first_response``, ``solution``, or
    ``update`` (one row per cycle: each customer message awaiting an answer starts one).

    While running, ``due_at`` is when the goal is used up, computed with the calendar from
    ``used_seconds`` (counted time before ``running_since``). The sweep reads only the partial
    index on ``next_notice_at``: the next warning level or the breach of a clock, never a
    scan of all tickets. See docs/sla.md.
    """

    __tablename__ = "sla_clocks"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(BigId, index=True)
    sla: Mapped[str] = mapped_column(String(64))  # the SLA definition's name
    target: Mapped[str] = mapped_column(String(16))  # first_response / update / solution
    cycle: Mapped[int] = mapped_column(Integer, default=0)
    calendar: Mapped[str | None] = mapped_column(String(64))  # None: calendar minutes (24x7)
    goal_minutes: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="running")  # running/paused/stopped
    started_at: Mapped[datetime]
    used_seconds: Mapped[int] = mapped_column(BigInteger, default=0)
    running_since: Mapped[datetime | None]  # start of the current running segment
    due_at: Mapped[datetime | None]  # while running; None when paused or stopped
    stopped_at: Mapped[datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(16))  # met / breached / cancelled
    breached_at: Mapped[datetime | None]  # when due_at passed (the clock may still run)
    next_level: Mapped[int] = mapped_column(Integer, default=0)  # next warning level, then breach
    next_notice_at: Mapped[datetime | None]  # when the sweep must look at this clock

    __table_args__ = (
        Index("uq_sla_clocks_ticket_target_cycle", "ticket_id", "target", "cycle", unique=True),
        Index("ix_sla_clocks_next_notice_at", "next_notice_at",
              postgresql_where=text("next_notice_at IS NOT NULL"),
              sqlite_where=text("next_notice_at IS NOT NULL")),
        Index("ix_sla_clocks_started_at", "started_at"),
    )


class SlaSegment(Base):
    """The SLA ledger: the running and paused spans of a clock, each with its reason, so
    ``mailgw explain`` can say why a ticket is due when it is."""

    __tablename__ = "sla_segments"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    clock_id: Mapped[int] = mapped_column(BigId, index=True)
    ticket_id: Mapped[int] = mapped_column(BigId, index=True)
    kind: Mapped[str] = mapped_column(String(16))  # running / paused
    start_at: Mapped[datetime]
    end_at: Mapped[datetime | None]  # None: the open segment
    reason: Mapped[str] = mapped_column(Text, default="")
    counted_seconds: Mapped[int | None] = mapped_column(BigInteger)  # business/calendar time counted


class SlaNotice(Base):
    """Each warning and breach of a clock, once: the unique (clock, level) row is the guard
    that makes a notice exactly-once across sweeps, restarts and nodes."""

    __tablename__ = "sla_notices"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    clock_id: Mapped[int] = mapped_column(BigId)
    ticket_id: Mapped[int] = mapped_column(BigId, index=True)
    level: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # warning / breach
    percent: Mapped[int] = mapped_column(Integer)
    due_at: Mapped[datetime]
    fired_at: Mapped[datetime]
    node: Mapped[str | None] = mapped_column(String(200))
    actions: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # what was done

    __table_args__ = (
        Index("uq_sla_notices_clock_level", "clock_id", "level", unique=True),
    )


class ImapMessage(Base):
    """The IMAP ledger: every message seen in a mailbox folder, by UIDVALIDITY and UID, with
    the hash of its bytes. Written in the transaction that queues the message, so a message
    in the ledger is durable, and one not in it was never queued (docs/imap.md)."""

    __tablename__ = "imap_messages"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    mailbox: Mapped[str] = mapped_column(String(200))
    folder: Mapped[str] = mapped_column(String(500))
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    uid: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[str | None] = mapped_column(String(998))
    # Date + From of the message: with the Message-ID, what identifies it when its bytes
    # changed under a new UIDVALIDITY.
    identity: Mapped[str | None] = mapped_column(String(1000))
    # queued: new inbound row; duplicate: the same bytes as an earlier message of this
    # mailbox; known: matched after a UIDVALIDITY change.
    status: Mapped[str] = mapped_column(String(16))
    inbound_id: Mapped[int | None] = mapped_column(BigId)
    action_done: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime]

    __table_args__ = (
        Index("uq_imap_messages_uid", "mailbox", "folder", "uidvalidity", "uid", unique=True),
        Index("ix_imap_messages_sha256", "mailbox", "sha256"),
        Index("ix_imap_messages_message_id", "mailbox", "message_id"),
        Index("ix_imap_messages_pending_action", "mailbox", "folder",
              postgresql_where=text("NOT action_done"), sqlite_where=text("NOT action_done")),
    )


class ImapFolder(Base):
    """Where reading a folder stands: its UIDVALIDITY and the highest UID taken in."""

    __tablename__ = "imap_folders"
    mailbox: Mapped[str] = mapped_column(String(200), primary_key=True)
    folder: Mapped[str] = mapped_column(String(500), primary_key=True)
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger, default=0)


class MailboxStatus(Base):
    """One row per configured mailbox: the poller lease (one poller per mailbox across
    processes and nodes; an expired lease is free) and what ``mailgw status`` shows."""

    __tablename__ = "mailbox_status"
    mailbox: Mapped[str] = mapped_column(String(200), primary_key=True)
    lease_holder: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None]
    last_poll_at: Mapped[datetime | None]
    last_ok_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[datetime | None]
    ingested: Mapped[int] = mapped_column(BigInteger, default=0)
