"""Ticket numbers in the OTRS style and the subject tag that carries them.

OTRS's "Date" generator gives ``YYYYMMDD`` + system id + a counter. We take the counter from
the ticket's own primary key instead of a separate counter row: it is unique across any number
of workers and nodes without a lock that every new ticket would have to queue on.
"""

from __future__ import annotations

import re
from datetime import datetime

from mailgw.settings import TicketNumbers


def format_number(cfg: TicketNumbers, ticket_id: int, created_at: datetime) -> str:
    counter = str(ticket_id).rjust(cfg.min_counter_digits, "0")
    if cfg.generator == "date":
        return f"{created_at:%Y%m%d}{cfg.system_id}{counter}"
    return f"{cfg.system_id}{counter}"


def subject_tag(cfg: TicketNumbers, number: str) -> str:
    return f"[{cfg.hook}{number}]"


def subject_pattern(cfg: TicketNumbers) -> re.Pattern[str]:
    """Matches the tag a reply's subject carries; the hook with or without brackets."""
    return re.compile(r"\[?\s*" + re.escape(cfg.hook) + r"\s*:?\s*(\d{4,30})\s*\]?", re.I)


def tag_subject(cfg: TicketNumbers, number: str, subject: str) -> str:
    """The subject of our mail about a ticket: tag first, unless it is already there."""
    if number in subject and subject_pattern(cfg).search(subject):
        return subject
    return f"{subject_tag(cfg, number)} {subject}".rstrip()
