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
    # The HTML body part as it came (decoded to text, NOT sanitised), or None. Unsafe: never
    # store it in an article or show or send it; ``html`` is the safe one. Ingest reads it
    # where it needs the HTML's text (no plain part, reply splitting), as text only.
    raw_html: str | None
    attachments: list[Attachment]
    headers: dict[str, list[str]]  # lower-cased name -> decoded values, in order
    defects: list[str] = field(default_factory=list)
    _html: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def html(self) -> str | None:
        """The sanitised HTML body (``mailgw.mail.sanitize.sanitize_html`` of ``raw_html``),
        or None. Computed at first access and kept: bleach costs ~0.3 ms a part, so ingest
        does not ask for it (decision 32); articles get it through ``article_html``."""
        if self.raw_html is None:
            return None
        if self._html is None:
            from mailgw.mail.sanitize import sanitize_html

            self._html = sanitize_html(self.raw_html)
        return self._html

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
