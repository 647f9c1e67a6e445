"""Read a bounce: which recipients failed, with what status, and which message bounced.

Two sources, in this order:

1. An RFC 3464 delivery status notification (``multipart/report;
   report-type=delivery-status``, or any ``message/delivery-status`` part): one block of
   fields per recipient, with ``Action`` (failed, delayed, delivered, relayed, expanded),
   ``Status`` (RFC 3463 ``class.subject.detail``) and ``Diagnostic-Code``. Failed and
   delayed recipients are reported; delivered/relayed/expanded ones are not failures.
2. Otherwise the non-standard formats real MTAs send (qmail, Exim, Postfix before DSNs,
   old Exchange, GroupWise, Yahoo, AOL, SMTP32, Netscape, Sina and some forty "simple"
   texts): these are read by flufl.bounce, Mailman's detector set, which has been
   collecting them for twenty years. We do not rewrite those heuristics; we add the status
   code found in the text.

The bounced message is named by the ``Message-ID`` in the returned original
(``message/rfc822`` or ``text/rfc822-headers`` part, or headers quoted in the text), and
by In-Reply-To/References where the MTA set them. Nothing here raises: a bounce that cannot
be read yields an empty report, and the classifier still calls it a bounce when its other
evidence says so.
"""

from __future__ import annotations

import email
import logging
import re
from dataclasses import dataclass, field
from email import policy
from email.message import Message

__all__ = ["BounceReport", "FailedRecipient", "read_bounce"]

log = logging.getLogger(__name__)

_MAX_PARTS = 200
_ADDRESS_TYPE = re.compile(r"^\s*[\w.-]+\s*;\s*", re.ASCII)  # "rfc822;" address-type
_ENHANCED_STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_SMTP_REPLY = re.compile(r"(?<![\d.])([45][0-5]\d)(?=[ -]\S)")
_MESSAGE_ID_LINE = re.compile(r"^[ \t>]*Message-ID[ \t]*:[ \t]*<?([^\s<>]+@[^\s<>]+?)>?[ \t\r]*$",
                              re.IGNORECASE | re.MULTILINE)
_BRACKETED = re.compile(r"<([^<>\s]+@[^<>\s]+)>")


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    address: str  # lower-cased
    permanent: bool  # False: a delay, the MTA keeps trying
    status: str | None = None  # RFC 3463 "5.1.1", or the SMTP reply code "550"
    action: str | None = None  # RFC 3464 Action: failed / delayed (None for non-DSN bounces)
    diagnostic: str | None = None

    def as_dict(self) -> dict:
        return {"address": self.address, "permanent": self.permanent, "status": self.status,
                "action": self.action, "diagnostic": self.diagnostic}


@dataclass(frozen=True, slots=True)
class BounceReport:
    recipients: tuple[FailedRecipient, ...] = ()
    # Message-IDs the bounce refers to, most reliable first (the returned original's own).
    original_message_ids: tuple[str, ...] = ()
    standard: bool = False  # an RFC 3464 report (machine-readable), not a heuristic
    detector: str = "none"  # "rfc3464", "flufl.bounce", "none"
    defects: tuple[str, ...] = field(default=())

    @property
    def permanent(self) -> bool:
        """Some recipient failed for good (a temporary-only report is a delay)."""
        return any(r.permanent for r in self.recipients)

    @property
    def addresses(self) -> list[str]:
        return sorted({r.address for r in self.recipients})


def _walk(msg: Message):
    """Parts in document order, iteratively and bounded."""
    stack, seen = [msg], 0
    while stack and seen < _MAX_PARTS:
        part = stack.pop()
        seen += 1
        yield part
        payload = part.get_payload()
        if isinstance(payload, list):
            stack.extend(reversed([p for p in payload if isinstance(p, Message)]))


def _field(block: Message, name: str) -> str | None:
    value = block.get(name)
    if value is None:
        return None
    return " ".join(str(value).split()) or None


def _address(value: str | None) -> str | None:
    if not value:
        return None
    value = _ADDRESS_TYPE.sub("", value, count=1).strip().strip("<>").strip()
    return value.lower() if "@" in value else None


def _status_blocks(part: Message) -> list[Message]:
    """The field blocks of a message/delivery-status part (per-message first)."""
    payload = part.get_payload()
    if isinstance(payload, list):  # the stdlib parsed the blocks as header-only messages
        return [p for p in payload if isinstance(p, Message)]
    if isinstance(payload, str):  # e.g. text/delivery-status, or a base64-encoded one
        data = part.get_payload(decode=True) or b""
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else payload
        blocks = re.split(r"\n[ \t]*\r?\n", text.replace("\r\n", "\n"))
        return [email.message_from_string(b.strip() + "\n", policy=policy.compat32)
                for b in blocks if b.strip()]
    return []


def _dsn(msg: Message) -> tuple[list[FailedRecipient], bool]:
    recipients: list[FailedRecipient] = []
    found = False
    for part in _walk(msg):
        ctype = part.get_content_type()
        if ctype not in ("message/delivery-status", "text/delivery-status",
                         "message/global-delivery-status"):
            continue
        found = True
        for block in _status_blocks(part):
            # Original-Recipient (optional) is the address as we sent it; Final-Recipient
            # may be a rewritten, internal one ("userx@sims-ms-daemon").
            address = _address(_field(block, "Original-Recipient")) or _address(
                _field(block, "Final-Recipient")) or _address(_field(block, "X-Actual-Recipient"))
            if address is None:
                continue  # the per-message block, or a recipient we cannot name
            action = (_field(block, "Action") or "").lower().split(" ")[0] or None
            if action and action.startswith(("fail", "error")):  # opensmtpd says "error"
                action = "failed"
            elif action and action.startswith("delay"):
                action = "delayed"
            status = _field(block, "Status")
            status_match = _ENHANCED_STATUS.search(status or "")
            status = ".".join(status_match.groups()) if status_match else status
            if action in ("delivered", "relayed", "expanded"):
                continue
            if action is None and not (status and status[0] in "45"):
                continue
            permanent = action == "failed" if action in ("failed", "delayed") else (
                (status or "5")[0] == "5")
            recipients.append(FailedRecipient(
                address=address, permanent=permanent, status=status, action=action,
                diagnostic=(_field(block, "Diagnostic-Code") or "")[:500] or None))
    return recipients, found


def _text_of(msg: Message, limit: int = 200_000) -> str:
    """The text of the bounce's own text parts (not of the returned original)."""
    chunks, size = [], 0
    for part in _walk(msg):
        if part.get_content_maintype() != "text" or part.get_content_type() == "text/rfc822-headers":
            continue
        data = part.get_payload(decode=True)
        if isinstance(data, bytes):
            chunks.append(data[: limit - size].decode("utf-8", "replace"))
            size += len(chunks[-1])
            if size >= limit:
                break
    return "\n".join(chunks)


def _status_in_text(text: str, address: str) -> str | None:
    """The status code nearest after the failed address in the bounce text, else the first."""
    at = text.lower().find(address)
    for start in ((at, 0) if at >= 0 else (0,)):
        window = text[start : start + 2000] if start else text
        found = _ENHANCED_STATUS.search(window) or _SMTP_REPLY.search(window)
        if found:
            return ".".join(found.groups()) if found.re is _ENHANCED_STATUS else found.group(1)
    return None


def _heuristic(msg: Message) -> list[FailedRecipient]:
    from flufl.bounce import all_failures  # imported on first bounce only

    try:
        temporary, permanent = all_failures(msg)
    except Exception as exc:  # a detector tripping over hostile input must not lose mail
        log.warning("bounce detectors failed: %s: %s", type(exc).__name__, exc)
        return []
    text = None
    out = []
    for addresses, is_permanent in ((permanent, True), (temporary, False)):
        for raw in sorted(addresses):
            address = (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw))
            address = address.strip().strip("<>").lower()
            if "@" not in address or any(r.address == address for r in out):
                continue
            if text is None:
                text = _text_of(msg)
            out.append(FailedRecipient(address=address, permanent=is_permanent,
                                       status=_status_in_text(text, address)))
    return out


def _original_ids(msg: Message) -> list[str]:
    ids: list[str] = []
    own = (msg.get("Message-ID") or "").strip().strip("<>")
    for part in _walk(msg):
        ctype = part.get_content_type()
        if part is msg:
            continue
        if ctype in ("message/rfc822", "message/global", "message/rfc822-headers"):
            inner = part.get_payload()
            inner = inner[0] if isinstance(inner, list) and inner else inner
            if isinstance(inner, Message) and inner.get("Message-ID"):
                ids.extend(_BRACKETED.findall(str(inner.get("Message-ID")))
                           or [str(inner.get("Message-ID")).strip().strip("<>")])
        elif ctype == "text/rfc822-headers" or ctype.startswith("text/"):
            data = part.get_payload(decode=True)
            if isinstance(data, bytes):
                ids.extend(m.group(1) for m in _MESSAGE_ID_LINE.finditer(
                    data[:200_000].decode("utf-8", "replace")))
    if not msg.is_multipart():
        data = msg.get_payload(decode=True)
        if isinstance(data, bytes):
            ids.extend(m.group(1) for m in _MESSAGE_ID_LINE.finditer(
                data[:200_000].decode("utf-8", "replace")))
    for name in ("In-Reply-To", "References"):
        ids.extend(_BRACKETED.findall(str(msg.get(name) or "")))
    return [i for i in dict.fromkeys(ids) if i and i != own]


def read_bounce(raw: bytes | Message) -> BounceReport:
    """What a bounce says. Never raises; an unreadable bounce gives an empty report."""
    try:
        msg = raw if isinstance(raw, Message) else email.message_from_bytes(
            raw, policy=policy.compat32)
        recipients, standard = _dsn(msg)
        detector = "rfc3464" if recipients else "none"
        if not recipients:
            recipients = _heuristic(msg)
            detector = "flufl.bounce" if recipients else detector
        return BounceReport(recipients=tuple(recipients),
                            original_message_ids=tuple(_original_ids(msg)),
                            standard=standard, detector=detector)
    except Exception as exc:  # noqa: BLE001 - hostile structure; the raw mail is kept anyway
        log.warning("bounce not readable: %s: %s", type(exc).__name__, exc)
        return BounceReport(defects=(f"bounce not readable ({type(exc).__name__})",))
