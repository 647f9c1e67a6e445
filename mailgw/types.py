"""Contracts shared by the intake, the worker and the outbound side.

Every module that produces or consumes one of these types imports it from here, so the
shape of a message as it travels through mailgw is declared in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message as it arrived, before anything was parsed: what intake makes durable."""

    raw: bytes
    # Envelope sender; "" for the null reverse-path "<>" (bounces); None when unknown
    # (``mailgw deliver`` run without ``--sender``).
    mail_from: str | None
    rcpt_tos: tuple[str, ...]
    source: str  # "smtp", "lmtp", "pipe" or "imap"
    received_at: datetime
    source_ref: str | None = None  # e.g. "mailbox/UIDVALIDITY/UID" for IMAP, peer for SMTP
    queue: str | None = None  # forced queue (``mailgw deliver --queue``), else by recipient


@dataclass(slots=True)
class Attachment:
    filename: str | None
    content_type: str
    data: bytes
    disposition: str = "attachment"  # "attachment" or "inline"
    content_id: str | None = None


@dataclass(slots=True)
class ParsedMail:
    """The decoded view of one message. Produced once per message by ``mailgw.mail.parse``."""

    message_id: str | None  # bare id, without the angle brackets
    in_reply_to: list[str]  # bare ids
    references: list[str]  # bare ids, oldest first
    subject: str
    from_addr: str  # lower-cased address, "" when absent or unparseable
    from_name: str
    to: list[str]  # lower-cased addresses
    cc: list[str]
    reply_to: list[str]
    date: datetime | None  # timezone-aware when the header had a zone
    text: str  # the plain-text body (derived from the HTML part when there is no text part)
    html: str | None  # sanitized HTML body, or None
    attachments: list[Attachment]
    headers: dict[str, list[str]]  # lower-cased name -> decoded values, in order
    defects: list[str] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """The first value of a header, or None."""
        values = self.headers.get(name.lower())
        return values[0] if values else None


class ParseError(Exception):
    """The input is not an email message at all (``mailgw deliver`` exits 65 on it)."""


def aware(dt: datetime | None) -> datetime | None:
    """A stored time as an aware UTC datetime: SQLite hands back naive ones, and every time
    mailgw stores is UTC."""
    if dt is None:
        return None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)
