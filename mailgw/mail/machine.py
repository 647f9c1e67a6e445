"""Recognise machine-generated mail, which must never get an automatic reply.

Answering a bounce, an out-of-office notice or a mailing list with an acknowledgement
starts a mail loop or spams a list (RFC 3834 §2). ``automatic_reason`` names the first
signal found. Bounce signals are checked first: many bounces also carry
``Auto-Submitted: auto-replied``, and "bounce" is the more useful reason to report.
"""

from __future__ import annotations

import re

from mailgw.types import ParsedMail

__all__ = ["automatic_reason", "unanswerable"]

_MAILER_DAEMON = re.compile(r"mailer[-_]?daemon", re.IGNORECASE)
# no-reply, noreply, no_reply, do-not-reply, donotreply..., also as a suffix
# ("billing-noreply"), but not inside a word.
_NO_REPLY = re.compile(r"(?:^|[^a-z])(?:no|do[-_.]?not)[-_.]?reply", re.IGNORECASE)
_SUPPRESSED = frozenset({"all", "oof", "autoreply"})
# RFC 3834 §2 names bulk, junk and list; "auto_reply" is what some autoresponders send.
_BULK_PRECEDENCE = frozenset({"bulk", "junk", "list", "auto_reply"})
_NEGATIVE = frozenset({"no", "false", "0"})
_PARAMETER = re.compile(r"""report-type\s*=\s*"?([^";\s]+)""", re.IGNORECASE)
_COMMENT = re.compile(r"\([^()]*\)")
_ANGLE_ADDR = re.compile(r"<([^<>]*)>")


def _first_token(value: str) -> str:
    """The keyword of a header value, without parameters or comments ("auto-replied")."""
    return _COMMENT.sub(" ", value).split(";", 1)[0].strip().lower()


def _local_part(address: str) -> str:
    return address.strip().strip("<>").rsplit("@", 1)[0].lower()


def _senders(parsed: ParsedMail, mail_from: str | None) -> list[str]:
    """Envelope sender, Return-Path (the envelope sender as recorded at delivery), From."""
    value = parsed.header("return-path") or ""
    bracketed = _ANGLE_ADDR.search(value)
    return_path = bracketed.group(1) if bracketed else value
    candidates = [mail_from or "", return_path, parsed.from_addr]
    return [address for address in candidates if address.strip()]


def _short(value: str, limit: int = 80) -> str:
    """Header values come from strangers and end up in logs: keep them on one short line."""
    value = " ".join(value.split())
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _bounce_reason(parsed: ParsedMail, mail_from: str | None) -> str | None:
    content_type = parsed.header("content-type") or ""
    if _first_token(content_type) == "multipart/report":  # RFC 6522: DSN, MDN, ARF
        report = _PARAMETER.search(content_type)
        return f"multipart/report ({report.group(1).lower() if report else 'report'})"
    # RFC 5321 §4.5.5: notifications are sent with the null reverse-path "<>". The
    # Return-Path header (RFC 5321 §4.4) carries it for mail read back from a mailbox.
    return_path = parsed.header("return-path")
    # None: the envelope sender is unknown (``mailgw deliver`` without ``--sender``).
    if (mail_from is not None and mail_from.strip() in ("", "<>")) or (return_path is not None and return_path.strip() == "<>"):
        return "empty return path (null sender)"
    for address in _senders(parsed, mail_from):
        local = _local_part(address)
        if _MAILER_DAEMON.fullmatch(local) or local == "postmaster":  # RFC 5321 §4.5.1
            return f"sender is {local} ({_short(address)})"
    return None


def _auto_reply_reason(parsed: ParsedMail, loop_header: str) -> str | None:
    auto_submitted = parsed.header("auto-submitted")
    if auto_submitted is not None and _first_token(auto_submitted) != "no":  # RFC 3834 §5
        return f"Auto-Submitted: {_short(auto_submitted) or '(empty)'}"
    for name in ("X-Autoreply", "X-Autorespond"):
        value = parsed.header(name)
        if value is not None and _first_token(value) not in _NEGATIVE:
            return f"{name}: {_short(value) or '(empty)'}"
    # Microsoft's header, set on auto-replies so that they do not trigger more of them.
    suppress = parsed.header("x-auto-response-suppress")
    if suppress is not None:
        values = {v.strip().lower() for v in suppress.split(",")}
        if values & _SUPPRESSED:
            return f"X-Auto-Response-Suppress: {_short(suppress)}"
    precedence = parsed.header("precedence")
    if precedence is not None and _first_token(precedence) in _BULK_PRECEDENCE:
        return f"Precedence: {_first_token(precedence)}"
    for name in dict.fromkeys(("X-Loop", loop_header)):  # ours may be configured otherwise
        value = parsed.header(name)
        if value is not None:
            return f"{name}: {_short(value) or '(empty)'}"
    return None


def _list_reason(parsed: ParsedMail) -> str | None:
    # RFC 2919 List-Id and RFC 2369 List-* headers: the message went to a list.
    list_id = parsed.header("list-id")
    if list_id is not None:
        return f"mailing list (List-Id: {_short(list_id)})"
    if parsed.header("list-unsubscribe") is not None:
        return "mailing list (List-Unsubscribe present)"
    return None


def _no_reply_reason(parsed: ParsedMail, mail_from: str) -> str | None:
    for address in _senders(parsed, mail_from):
        if _NO_REPLY.search(_local_part(address)):
            return f"no-reply sender ({_short(address)})"
    return None


def automatic_reason(parsed: ParsedMail, mail_from: str | None,
                     loop_header: str = "X-Loop") -> str | None:
    """None for mail from a person; else why the message is machine-generated.

    ``mail_from`` is the envelope sender, "" for the null reverse-path, None when unknown;
    ``loop_header`` is the loop header our own automatic mail carries (setting loop_header).
    """
    return (
        _bounce_reason(parsed, mail_from)
        or _auto_reply_reason(parsed, loop_header)
        or _list_reason(parsed)
        or _no_reply_reason(parsed, mail_from)
    )


def unanswerable(address: str) -> bool:
    """True for an address that must never get an automatic answer (MAILER-DAEMON,
    postmaster, no-reply…), e.g. a Reply-To pointing at one."""
    local = _local_part(address)
    return bool(_MAILER_DAEMON.fullmatch(local) or local == "postmaster"
                or _NO_REPLY.search(local))
