"""Recognise machine-generated mail, which must never get an automatic reply.

Answering a bounce, an out-of-office notice or a mailing list with an acknowledgement
starts a mail loop or spams a list (RFC 3834 §2). The classification itself lives in
``mailgw.mail.classify``; ``automatic_reason`` is its one-line summary (None for a person),
kept for callers that only need to know whether to answer.
"""

from __future__ import annotations

from mailgw.mail.classify import Ours, classify, unanswerable
from mailgw.types import ParsedMail

__all__ = ["automatic_reason", "unanswerable"]


def automatic_reason(parsed: ParsedMail, mail_from: str | None,
                     loop_header: str = "X-Loop", raw: bytes | None = None) -> str | None:
    """None for mail from a person; else why the message is machine-generated.

    ``mail_from`` is the envelope sender, "" for the null reverse-path, None when unknown;
    ``loop_header`` is the loop header our own automatic mail carries (setting loop_header);
    ``raw`` lets a bounce without header signals be recognised by its text.
    """
    return classify(parsed, mail_from, raw=raw, ours=Ours(loop_header=loop_header)).reason
