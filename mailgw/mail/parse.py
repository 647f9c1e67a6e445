"""Turn the raw bytes of one inbound message into a ``ParsedMail``.

Which parser, and why
---------------------
Both candidates were measured over the 2,696 messages of the shared test corpus
(``../shared/corpus``). The stdlib ``email`` package with ``policy.compat32`` parsed every
message and decoded every part in about 0.2 ms on average and raised on none of them.
mail-parser 4.8.0 (``mailparser.parse_from_bytes``) took about 0.95 ms per message and
raised ``AttributeError`` on two of them (mimekit's simple.mbox.txt #1 and #2). It is built
on the same stdlib parser and adds work this gateway does not need: it builds its summary
dict twice, parses every Received header, guesses the sender's IP address, re-encodes
every attachment as base64 text and logs a warning for every part it does not handle.
None of those extras fills a field of ``ParsedMail``, and its one capability the stdlib
lacks, Outlook ``.msg`` conversion, needs the external ``msgconvert`` tool and concerns a
file format that never arrives over SMTP, LMTP, IMAP or a pipe. So every message goes
through the stdlib and mail-parser is not called; should a forensic feature ever need its
Received-header analysis, this module is the one place allowed to import it.

With the decoding below and the HTML sanitising, a message takes about 0.6 ms on average
over the same corpus (median 0.27 ms). The costliest single step is bleach: it sanitises
HTML at about 2 MB/s (1.6 ms for the corpus's average 3.5 KB HTML part), so traffic that is
mostly HTML costs more per message than this corpus suggests.

``compat32`` rather than ``policy.default`` because the modern header objects parse
lazily and raise long after ``message_from_bytes`` returned (``Group`` without
``local_part``, ``IndexError``, ``ValueError`` on CR/LF in address parts: 10 corpus
messages), and because ``compat32`` is ten times faster. The price is that ``compat32``
leaves decoding to us: header values come back raw (undecoded RFC 2047 words, 8-bit bytes
as surrogate escapes), so the decoding below is written out, with charset fallbacks that
cannot raise.

Contract (see ``mailgw.types``): ``parse_message`` raises ``ParseError`` only when
``looks_like_mail`` is False; anything else, however broken, yields a ``ParsedMail`` with
the problems listed in ``defects``.
"""

from __future__ import annotations

import binascii
import email
import re
import secrets
from collections.abc import Iterator
from email import policy
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from email.utils import getaddresses, parsedate_to_datetime
from io import BytesIO, StringIO

from mailgw.mail.charsets import LATIN1_SUPERSET, codec_for, decode
from mailgw.mail.feed import BoundaryMatcher, BufferedSubFile, BytesFeedParser
from mailgw.types import Attachment, ParsedMail, ParseError

__all__ = ["looks_like_mail", "parse_message"]

# --- Is it mail at all? -------------------------------------------------------------------

_BOM = b"\xef\xbb\xbf"
# An mbox separator line (RFC 4155) may precede the header; "From :" is a header, not one.
_UNIX_FROM = re.compile(rb"From (?![ \t]*:)[^\n]*\n")
_LEADING_WHITESPACE = re.compile(rb"[ \t\r\n]*")
# RFC 5322 §3.6.8 allows any printable ASCII but ":" in a field name; real names are
# letters, digits and "-", which keeps JSON, PDF and other binaries from passing.
# Whitespace before the colon is the obsolete syntax of RFC 5322 §4.5.
_FIELD_NAME = re.compile(rb"[A-Za-z0-9][A-Za-z0-9_.\-]*[ \t]*:")


def _header_start(raw: bytes) -> int:
    """Offset of the first header field in ``raw``, or -1 when there is no header block.

    Tolerates a UTF-8 byte-order mark, an mbox "From " line and blank lines or indentation
    before the first field, which editors and pipes add; the stdlib would otherwise read
    such a header as body text.
    """
    pos = len(_BOM) if raw.startswith(_BOM) else 0
    unix_from = _UNIX_FROM.match(raw, pos)
    if unix_from:
        pos = unix_from.end()
    pos = _LEADING_WHITESPACE.match(raw, pos).end()
    return pos if _FIELD_NAME.match(raw, pos) else -1


def looks_like_mail(raw: bytes) -> bool:
    """True when ``raw`` starts with an RFC 5322 header block, i.e. is an email at all."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        return False
    # bytes and bytearray are scanned where they are (a large message is not copied).
    return _header_start(raw if isinstance(raw, (bytes, bytearray)) else bytes(raw)) >= 0


# --- Charsets -----------------------------------------------------------------------------

# The label table and the fallbacks live in mailgw.mail.charsets (never raises).
_codec = codec_for
_decode_bytes = decode
_LATIN1_SUPERSET = LATIN1_SUPERSET


# --- Header values ------------------------------------------------------------------------

_SURROGATE = re.compile("[\udc80-\udcff]")
# RFC 5322 §2.2.3: unfolding removes the CRLF; the folding whitespace becomes one space.
_FOLD = re.compile(r"[ \t]*(?:\r\n|\r|\n)[ \t]*")
# RFC 2047 §2 encoded-word; the encoded text is matched leniently (some encoders put spaces
# or "?" in Q words), the closing "?=" ends it.
# RFC 2047 §2: encoded-text never contains "?" (Q encodes it as =3F). Matching "[^?]*" instead
# of ".*?" keeps the scan linear: a header full of unclosed "=?" must not cost quadratic time.
_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,75})\?([bBqQ])\?([^?]*)\?=")
_BASE64_JUNK = re.compile(rb"[^A-Za-z0-9+/]")


def _unescape(value: str, hint: str | None = None) -> str:
    """Turn 8-bit header bytes (kept by the stdlib as surrogate escapes) into text.

    RFC 6532 allows raw UTF-8 in headers; older mailers wrote raw legacy bytes, most often
    in the charset of the message body, which is the ``hint``.
    """
    if value.isascii() or not _SURROGATE.search(value):  # isascii: a flag, not a scan
        return value
    data = value.encode("utf-8", "surrogateescape")
    for codec in ("utf-8", hint, _LATIN1_SUPERSET):
        if codec:
            try:
                return data.decode(codec)
            except (UnicodeError, LookupError):
                continue
    return data.decode("utf-8", "replace")


def _decode_word(encoding: str, text: str) -> bytes | None:
    data = text.encode("utf-8")
    if encoding in "qQ":
        return binascii.a2b_qp(data, header=True)  # "_" is a space in headers (RFC 2047 §4.2)
    data = _BASE64_JUNK.sub(b"", data)
    if len(data) % 4 == 1:  # a dangling sextet carries no byte
        data = data[:-1]
    try:
        return binascii.a2b_base64(data + b"=" * (-len(data) % 4))
    except binascii.Error:
        return None


def _decode_rfc2047(value: str, defects: list[str]) -> str:
    """Decode RFC 2047 encoded-words, tolerantly.

    Adjacent words in the same charset are joined before decoding, because encoders split
    multi-byte characters across words; whitespace between two encoded-words is dropped
    (RFC 2047 §6.2). Words embedded in other text are decoded too, as every client does.
    """
    if "=?" not in value:
        return value
    out: list[str] = []
    pending_label: str | None = None
    pending = bytearray()

    def flush() -> None:
        nonlocal pending_label
        if pending_label is not None:
            out.append(_decode_bytes(bytes(pending), pending_label, defects))
            pending.clear()
            pending_label = None

    pos = 0
    for match in _ENCODED_WORD.finditer(value):
        literal = value[pos : match.start()]
        pos = match.end()
        if literal and not (pending_label is not None and literal.isspace()):
            flush()
            out.append(literal)
        label, encoding, text = match.groups()
        data = _decode_word(encoding, text)
        if data is None:
            flush()
            defects.append("undecodable RFC 2047 encoded-word kept as is")
            out.append(match.group(0))
            continue
        if pending_label is not None and _same_charset(pending_label, label):
            pending += data
        else:
            flush()
            pending_label = label
            pending += data
    flush()
    out.append(value[pos:])
    return "".join(out)


def _same_charset(a: str, b: str) -> bool:
    return a.lower() == b.lower() or (_codec(a) is not None and _codec(a) == _codec(b))


def _clean(text: str, defects: list[str]) -> str:
    """PostgreSQL text cannot hold NUL: replace it, visibly, rather than fail downstream."""
    if "\x00" in text:
        defects.append("NUL characters replaced")
        return text.replace("\x00", "\ufffd")
    return text


_MAX_HEADER = 32 * 1024


class _Headers:
    """Each header once unfolded (``raw``, for structured parsing) and fully decoded."""

    raw: dict[str, list[str]]
    decoded: dict[str, list[str]]

    def __init__(self, msg: Message, hint: str | None, defects: list[str]) -> None:
        self.raw = raw = {}
        self.decoded = decoded = {}
        # The tests that skip a step are the ones the step starts with (_unescape: ASCII;
        # _decode_rfc2047: "=?"; _clean: NUL): most values need none of the steps.
        for name, value in msg.raw_items():
            key = name.strip().lower()
            if not value.isascii():
                value = _unescape(value, hint)
            if "\n" in value or "\r" in value:  # the common header is one line: skip the regex
                value = _FOLD.sub(" ", value)
            value = value.strip()
            if len(value) > _MAX_HEADER:
                # Real headers stay far below this (References with 50 ids: ~5 KB); longer is
                # an attack or a broken mailer. The raw message keeps the whole value.
                defects.append(f"{key} header of {len(value)} characters truncated")
                value = value[-_MAX_HEADER:] if key in ("references", "in-reply-to") else value[:_MAX_HEADER]
            text = _decode_rfc2047(value, defects) if "=?" in value else value
            if "\x00" in text:
                text = _clean(text, defects)
            values = raw.get(key)
            if values is None:
                raw[key] = [value]
                decoded[key] = [text]
            else:
                values.append(value)
                decoded[key].append(text)

    def first(self, name: str) -> str | None:
        values = self.raw.get(name)
        return values[0] if values else None


# --- Structured headers -------------------------------------------------------------------

_BRACKETED_ID = re.compile(r"<([^<>]*)>")
# Splitting on separators, then keeping tokens with an "@", is linear; a findall of
# "[^sep]+@[^sep]+" retries every start position of a long run and is quadratic.
_ID_SEPARATORS = re.compile(r"[\s<>,;()\"']+")


def _message_ids(values: list[str]) -> list[str]:
    """Bare msg-ids (RFC 5322 §3.6.4) from In-Reply-To/References-like values.

    Bracketed ids win; phrases and comments around them (obsolete In-Reply-To syntax) are
    ignored. Without any brackets, whitespace- or comma-separated tokens with an "@" are
    taken as ids, since some mailers drop the brackets.
    """
    ids: list[str] = []
    for value in values:
        found = ["".join(m.split()) for m in _BRACKETED_ID.findall(value)]
        found = [i for i in found if i] or [
            t for t in _ID_SEPARATORS.split(value) if "@" in t.strip("@")
        ]
        ids.extend(found)
    return list(dict.fromkeys(ids))  # a reference loop or repeat adds nothing


def _message_id(value: str | None) -> str | None:
    if not value:
        return None
    ids = _message_ids([value])
    if ids:
        return ids[0]
    token = value.strip("<> \t")
    return token if token and not any(c.isspace() for c in token) else None


def _addresses(values: list[str], defects: list[str]) -> list[tuple[str, str]]:
    """(decoded display name, lower-cased address) pairs; empty entries dropped.

    The undecoded value is split first: a decoded display name may contain the commas and
    quotes that separate addresses.
    """
    if not values:
        return []
    try:
        pairs = _simple_addresses(values)
        if pairs is None:
            pairs = getaddresses(values)
    except Exception:  # the legacy parser is tolerant, but this is hostile input
        defects.append("unparseable address header")
        return []
    result = []
    for name, addr in pairs:
        addr = addr.strip().lower()
        if addr:
            result.append((_decode_rfc2047(name, defects).strip(), addr))
    return result


# The forms most mail uses, for which getaddresses' answer is the text itself: a bare
# addr-spec, or a display name (atoms separated by single spaces, or one quoted string
# without backslashes) before an addr-spec in angle brackets; a list of them separated by
# commas. Atoms are the printable ASCII characters that end no phrase in the legacy parser
# (email._parseaddr: no specials, no whitespace), the addr-spec's parts plain letters, digits
# and "._%+-". Anything else is left to getaddresses (tests/test_parse_fast.py compares the
# two on random values).
_ATOM = r"[!#-'*+\-./0-9=?A-Z^-~]+"
_ADDR_SPEC = r"[A-Za-z0-9_%+\-.]+@[A-Za-z0-9\-.]+"
_SIMPLE_ADDRESS = re.compile(
    rf"[ \t]*(?:(?:({_ATOM}(?: {_ATOM})*)|\"([^\"\\\r\n]*)\")?[ \t]*<({_ADDR_SPEC})>|({_ADDR_SPEC}))[ \t]*"
)


def _simple_addresses(values: list[str]) -> list[tuple[str, str]] | None:
    """``getaddresses(values)`` when every address is of a simple form; else None."""
    pairs = []
    for value in values:
        for piece in value.split(","):
            match = _SIMPLE_ADDRESS.fullmatch(piece)
            if match is None:
                return None
            atoms, quoted, bracketed, bare = match.groups()
            if bare is not None:
                pairs.append(("", bare))
            else:
                pairs.append((atoms if atoms is not None else quoted or "", bracketed))
    return pairs


def _address_list(values: list[str], defects: list[str]) -> list[str]:
    return list(dict.fromkeys(addr for _, addr in _addresses(values, defects)))


def _parse_date(value: str | None, defects: list[str]):
    if not value:
        return None
    try:
        return parsedate_to_datetime(value)
    except Exception:  # TypeError/ValueError/OverflowError/IndexError on garbage
        defects.append("unparseable Date header")
        return None


# --- MIME parts ---------------------------------------------------------------------------

_NAME_HEADERS = ("content-disposition", "content-type")
_MAX_DEPTH = 40  # MIME nesting beyond this is an attack or a loop, not a customer's mail
_BODY_TYPES = frozenset({"text/plain", "text/html"})
# Renderings of the body that are not worth an attachment when they are not the body.
_ALTERNATIVE_BODY_TYPES = _BODY_TYPES | {"text/enriched", "text/richtext", "text/x-amp-html"}
_DELIMITER = re.compile(r"^--(\S{1,200}?)(?:--)?[ \t]*\r?$", re.MULTILINE)
_PART_HEADER = re.compile(r"\r?\nContent-[A-Za-z-]+[ \t]*:", re.IGNORECASE)
_SALVAGED_BOUNDARY = "mailgw-salvaged-boundary-5f1c"
_META_CHARSET = re.compile(rb"<meta[^>]{0,200}?charset=[\"']?([A-Za-z0-9_.:\-]+)", re.I)


def _salvage_multipart(part: Message, defects: list[str]) -> Message | None:
    """Re-parse a multipart whose declared boundary never occurs in its body.

    Happens when the boundary parameter is missing or mangled (the stdlib even strips
    "<...>" from a quoted boundary such as "<<001-3e1d>>"). If the body has delimiter lines
    (RFC 2046 §5.1.1), they are rewritten to a clean boundary and the body parsed again.
    """
    body = part.get_payload()
    if not isinstance(body, str):
        return None
    first = _DELIMITER.search(body)
    if first is None:
        return None
    line = re.compile(rf"^--{re.escape(first.group(1))}(--)?[ \t]*(?=\r?$)", re.MULTILINE)
    fixed, count = line.subn(lambda m: f"--{_SALVAGED_BOUNDARY}{m.group(1) or ''}", body)
    # One delimiter is enough when MIME headers follow it; otherwise a lone dashed line
    # (a signature separator, say) is no evidence of structure.
    if count < 2 and not _PART_HEADER.match(body, first.end()):
        return None
    header = f'Content-Type: {part.get_content_type()}; boundary="{_SALVAGED_BOUNDARY}"\n\n'
    salvaged = email.message_from_bytes(
        (header + fixed).encode("utf-8", "surrogateescape"), policy=policy.compat32
    )
    if not salvaged.is_multipart():
        return None
    defects.append(f"{part.get_content_type()} boundary recovered from the body")
    return salvaged


def _leaves(msg: Message, defects: list[str]) -> Iterator[tuple[Message, str]]:
    """Leaf parts in document order with their effective content type, collecting defects.

    Iterative, so nesting cannot exhaust the stack. ``message/*`` parts are leaves: an
    attached message is an attachment, not part of this message's body.
    """
    stack = [(msg, 0)]
    while stack:
        part, depth = stack.pop()
        defects.extend(type(defect).__name__ for defect in part.defects)
        ctype = part.get_content_type()
        if part.is_multipart() and not ctype.startswith("message/"):
            if depth >= _MAX_DEPTH:
                defects.append(f"MIME nesting deeper than {_MAX_DEPTH}; inner parts skipped")
                continue
            children = [c for c in part.get_payload() if isinstance(c, Message)]
            stack.extend((child, depth + 1) for child in reversed(children))
            continue
        if ctype.startswith("multipart/"):
            salvaged = _salvage_multipart(part, defects)
            if salvaged is not None and depth < _MAX_DEPTH:
                stack.append((salvaged, depth + 1))
                continue
            body = part.get_payload()
            if not isinstance(body, str) or not body.strip():
                continue  # an empty shell: nothing to keep
            ctype = "text/plain"  # keep whatever text there is rather than lose it
        yield part, ctype


def _param(part: Message, getter, defects: list[str]) -> str | None:
    try:
        value = getter()
    except Exception:  # malformed RFC 2231 parameters
        defects.append("unparseable MIME parameter")
        return None
    if not value:
        return None
    return _clean(_decode_rfc2047(_unescape(str(value)).strip(), defects), defects) or None


def _filename(part: Message, defects: list[str]) -> str | None:
    """The attachment's name: RFC 2231 parameters, then RFC 2047 words some clients use.

    ``compat32`` turns raw 8-bit bytes in a header into U+FFFD when it is read through
    ``Message.get``; for such headers the name is read from a copy decoded up front.
    """
    source = part
    raw = [(k, v) for k, v in part.raw_items() if k.lower() in _NAME_HEADERS]
    if any(_SURROGATE.search(v) for _, v in raw):
        hint = _codec(part.get_content_charset())
        source = Message()
        for key, value in raw:
            source[key] = _unescape(value, hint)
    return _param(source, source.get_filename, defects)


def _flatten(msg: Message, defects: list[str]) -> bytes:
    """Bytes of an enclosed message, as close to the wire form as the stdlib allows."""
    buffer = BytesIO()
    try:
        BytesGenerator(buffer, mangle_from_=False, maxheaderlen=0).flatten(msg)
    except Exception:
        defects.append("enclosed message could not be re-serialised")
        return b""
    return buffer.getvalue()


def _payload_bytes(part: Message, ctype: str, defects: list[str]) -> bytes:
    if ctype.startswith("message/"):
        payload = part.get_payload()
        if isinstance(payload, list):  # parsed enclosed message(s), e.g. rfc822, delivery-status
            return b"".join(_flatten(m, defects) for m in payload if isinstance(m, Message))
    # Base64 (most attachments) decoded straight from the payload string: the stdlib's
    # get_payload(decode=True) makes three copies of a part on the way (an ASCII encode,
    # a list of its lines and their join) and held 25 MB messages at 6x their size. The
    # payload is read as stored: get_payload() checks for surrogates by encoding a copy.
    data = getattr(part, "_mailgw_data", None)
    if data is not None:  # decoded while parsing (_RunBuffer.settle)
        return data
    payload = part._payload
    if isinstance(payload, str) and payload.isascii():
        cte = str(part.get("content-transfer-encoding", "")).lower()
        if cte == "base64":
            try:
                # Where this succeeds the stdlib's decode_b returns the same bytes (it
                # ignores line breaks and, failing validation, other non-alphabet
                # characters too); bad padding raises here and takes the stdlib's
                # lenient path below.
                return binascii.a2b_base64(payload)
            except (binascii.Error, ValueError):
                pass
        # What get_payload(decode=True) does with an ASCII string payload (no surrogates:
        # its encode cannot fail): quoted-printable is quopri.decodestring, i.e. a2b_qp;
        # any other encoding but uuencode's names gives the ASCII bytes.
        elif cte == "quoted-printable":
            return binascii.a2b_qp(payload.encode("ascii"))
        elif cte not in _UUENCODE:
            return payload.encode("ascii")
    data = part.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


# The transfer encodings get_payload(decode=True) reads as uuencode.
_UUENCODE = frozenset({"x-uuencode", "uuencode", "uue", "x-uue"})


def _part_text(part: Message, ctype: str, defects: list[str]) -> str:
    data = _payload_bytes(part, ctype, defects)
    label = _param(part, part.get_content_charset, defects)
    if label is None and ctype == "text/html":
        meta = _META_CHARSET.search(data, 0, 4096)
        label = meta.group(1).decode("ascii") if meta else None
    text = _decode_bytes(data, label, defects)
    return _clean(text.replace("\r\n", "\n"), defects)


def _attachment(part: Message, ctype: str, filename: str | None, defects: list[str]):
    content_id = _param(part, lambda: part.get("content-id"), defects)
    if content_id:
        content_id = content_id.strip().strip("<>").strip() or None
    if ctype in ("message/rfc822", "message/global"):
        filename = filename or "message"
        if not filename.lower().endswith(".eml"):
            filename += ".eml"
    declared = part.get_content_disposition()
    inline = declared == "inline" or (declared is None and content_id is not None)
    return Attachment(
        filename=filename,
        content_type=ctype,
        data=_payload_bytes(part, ctype, defects),
        disposition="inline" if inline else "attachment",
        content_id=content_id,
    )


def _body_and_attachments(msg: Message, defects: list[str]):
    """(text, raw_html, attachments) per the ParsedMail contract.

    The body is the first inline, unnamed text/plain part and the first such text/html
    part; an empty one gives way to a later one with content. Every other leaf is an
    attachment, except further unnamed inline renderings of the body (the other halves of
    multipart/alternative). Leaves without a filename or disposition, such as
    application/pdf or text/calendar, are attachments too: dropping them would lose what
    the customer sent.
    """
    candidates: dict[str, list[Message]] = {"text/plain": [], "text/html": []}
    attachments: list[Attachment] = []
    for part, ctype in _leaves(msg, defects):
        filename = _filename(part, defects)
        disposition = part.get_content_disposition()
        if ctype in _ALTERNATIVE_BODY_TYPES and disposition != "attachment" and not filename:
            if ctype in candidates:
                candidates[ctype].append(part)
        else:
            attachments.append(_attachment(part, ctype, filename, defects))
            # Decoded: the encoded text (or the early decoding) goes now, not with the tree.
            part._payload = part._mailgw_data = None
    text = _first_with_content(candidates["text/plain"], "text/plain", defects)
    raw_html = _first_with_content(candidates["text/html"], "text/html", defects)
    # Not sanitised here (decision 32): ParsedMail.html does it when asked, article_html
    # when an article is shown. The text is made from the HTML as it came.
    html = raw_html if candidates["text/html"] else None
    if not text.strip() and raw_html:  # no plain part, or an empty one next to real HTML
        # Imported here: `mailgw deliver` needs only looks_like_mail from this module.
        from mailgw.mail.sanitize import html_to_text

        text = html_to_text(raw_html)
    return text, html, attachments


def _first_with_content(parts: list[Message], ctype: str, defects: list[str]) -> str:
    first = ""
    for index, part in enumerate(parts):
        text = _part_text(part, ctype, defects)
        if text.strip():
            return text
        if index == 0:
            first = text
    return first


# --- The message --------------------------------------------------------------------------


def _build(msg: Message, defects: list[str], body) -> ParsedMail:
    hint = _codec(msg.get_content_charset()) if msg.get_content_maintype() == "text" else None
    headers = _Headers(msg, hint, defects)
    senders = _addresses(headers.raw.get("from", []), defects)
    from_name, from_addr = senders[0] if senders else ("", "")
    text, html, attachments = body(msg, defects)
    subjects = headers.decoded.get("subject")
    return ParsedMail(
        message_id=_message_id(headers.first("message-id")),
        in_reply_to=_message_ids(headers.raw.get("in-reply-to", [])),
        references=_message_ids(headers.raw.get("references", [])),
        subject=subjects[0] if subjects else "",
        from_addr=from_addr,
        from_name=_clean(from_name, defects),
        to=_address_list(headers.raw.get("to", []), defects),
        cc=_address_list(headers.raw.get("cc", []), defects),
        reply_to=_address_list(headers.raw.get("reply-to", []), defects),
        date=_parse_date(headers.first("date"), defects),
        text=text,
        raw_html=html,
        attachments=attachments,
        headers=headers.decoded,
        defects=list(dict.fromkeys(defects)),
    )


def _raw_body_as_text(msg: Message, defects: list[str]):
    payload = msg.get_payload()
    data = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else b""
    return _clean(_decode_bytes(data, None), defects), None, []


def _minimal(raw: bytes, defects: list[str]) -> ParsedMail:
    return ParsedMail(
        message_id=None, in_reply_to=[], references=[], subject="", from_addr="",
        from_name="", to=[], cc=[], reply_to=[], date=None,
        text=_clean(raw.decode("utf-8", "replace"), defects), raw_html=None, attachments=[],
        headers={}, defects=defects,
    )  # fmt: skip


_FEED_CHUNK = 1 << 20
# A line of base64 (or any run of letters, digits, "+", "/", "="): it can be neither a
# header field (no colon, no leading space), nor a MIME delimiter (those start with "--"),
# nor the blank line that ends a header block.
# Lines start after "\n" (a line ending in a lone "\r" just does not start a run).
# Possessive (no backtracking points kept per line): neither "\r" nor "\n" is in the class,
# so giving characters or lines back could never make another match.
_BODY_RUN = re.compile(r"(?:[A-Za-z0-9+/=]{16,}+\r?+\n)++")  # matched at a line start


def _runs(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of base64-like lines in ``text``: what
    ``re.compile(r"^(?:[A-Za-z0-9+/=]{16,}\r?\n)+", re.MULTILINE).finditer`` finds, faster.

    Each run's first line is found by a pattern, the rest by ``_run_end``."""
    first = _LINE.match(text)
    pos = 0
    if first:
        pos = _run_end(text, 0, first.end())
        yield 0, pos
    while (found := _NEXT_LINE.search(text, pos)) is not None:
        start = found.start(1)
        pos = _run_end(text, start, found.end())
        yield start, pos


_LINE = re.compile(r"[A-Za-z0-9+/=]{16,}+\r?+\n")  # one line of a run, at a line start
# The runs after the first: a line start is just after a "\n" (what "^" means with
# re.MULTILINE), and a pattern that starts with that literal is searched for quickly
# (a "^" pattern is tried at every character).
_NEXT_LINE = re.compile(r"\n([A-Za-z0-9+/=]{16,}+\r?+\n)")
# Each byte as _run_end's template sees it: a base64-like character is "a"; CR and LF are
# themselves; anything else is NUL, which no template has.
_LINE_CLASSES = bytes(ord("a") if chr(b) in "+/=" or chr(b).isascii() and chr(b).isalnum()
                      else b if b in b"\r\n" else 0 for b in range(256))
_BLOCK_LINES = 128  # lines compared at once by _run_end


def _run_end(text: str, start: int, end: int) -> int:
    """The end of the run whose first line is ``text[start:end]``.

    The lines of an encoded attachment have one width (76 characters and the line break,
    most often), so the run is taken in blocks of 1, 2, 4 ... ``_BLOCK_LINES`` lines: a
    block whose bytes, mapped by ``_LINE_CLASSES``, equal that many lines of the first line's width and line
    break is that many lines the run's pattern matches. The first block that differs (the
    last, shorter line, or other text) and what follows it are left to the pattern itself,
    which decides line by line as before. ``_BODY_RUN`` alone scans a character at a time:
    about 1 ms for a 280 KB attachment, a third of its parse (bench/RESULTS.md, issue 8
    session 8); a block costs a few copies and one comparison."""
    width = end - start
    ending = "\r\n" if text.startswith("\r", end - 2) else "\n"
    template = None
    # One line first, then twice as many each time, up to _BLOCK_LINES: a run of a few
    # lines (text that merely looks like base64: a list of checksums, a row of tokens) costs
    # a block of its own size, not one of _BLOCK_LINES lines (review: a 21 MB list of
    # checksums parsed 3x slower than with the pattern alone).
    lines = 1
    line = None
    while end + width * lines <= len(text):
        size = width * lines
        # The block's last line must end where the width says: checked first (no copy).
        if not text.startswith(ending, end + size - len(ending)):
            break
        block = text[end:end + size]
        if not block.isascii():
            break
        if line is None:
            line = b"a" * (width - len(ending)) + ending.encode()
        if template is None or len(template) != size:
            template = line * lines
        if block.encode("ascii").translate(_LINE_CLASSES) != template:
            break
        end += size
        lines = min(lines * 2, _BLOCK_LINES)
    more = _BODY_RUN.match(text, end)
    return more.end() if more else end


# Runs at least this long stay in the raw bytes; the parser sees a placeholder line.
_RUN_MIN = 64 * 1024
_PLACEHOLDER = re.compile("\x00([0-9a-f]{16}):([0-9]+)\x00")
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/=\r\n]*")


def _separators(matchers: list) -> tuple[str, ...] | None:  # type: ignore[type-arg]
    """The separators of the parser's false-EOF matchers, when all are a ``BoundaryMatcher``'s
    ``match`` (a line that starts with none of them matches none); else None."""
    starts = []
    for pred in matchers:
        matcher = getattr(pred, "__self__", None)
        if not (isinstance(matcher, BoundaryMatcher)
                and getattr(pred, "__func__", None) is BoundaryMatcher.match):
            return None  # a blank-line matcher (message/delivery-status), or a pattern
        starts.append(matcher.separator)
    return tuple(starts)


class _RunBuffer(BufferedSubFile):
    """The stdlib parser's line buffer, with each run of base64-like lines handed out as
    one line, and long runs left in the raw bytes.

    The stdlib keeps every line of a part as its own ``str`` until the part ends (about 130
    bytes for a 78-byte base64 line: 1.7x a 25 MB attachment), joins them, then copies the
    join to drop the last line break; after all that the tree holds the whole message as
    text. Every per-line test the parser makes (header field, MIME delimiter, blank line)
    is decided by the start of a line and cannot match a base64-like line, so handing a run
    out as one line yields the same tree. A run of ``_RUN_MIN`` or more is handed out as a
    placeholder (NUL, a per-message nonce, the run's number, NUL: no header, delimiter or
    blank line either, and not forgeable by the message) followed by the run's last line
    break; the run's text stays in ``raw`` as an offset range. ``settle`` then decodes
    base64 parts made of such runs straight from ``raw`` and puts the text back everywhere
    else, so every part reads as the stdlib would have parsed it.
    """

    def __init__(self, raw: bytes, start: int) -> None:
        super().__init__()
        self.raw = raw
        self.pos = start  # offset in raw of the next character handed to pushlines
        self.nonce = ""  # made with the first placeholder: most messages have none
        self.runs: list[tuple[int, int]] = []
        self._starts: tuple[str, ...] | None = ()  # see readline

    def push_eof_matcher(self, pred) -> None:  # type: ignore[no-untyped-def]
        super().push_eof_matcher(pred)
        self._starts = _separators(self._eofstack)

    def pop_eof_matcher(self):  # type: ignore[no-untyped-def]
        pred = super().pop_eof_matcher()
        self._starts = _separators(self._eofstack)
        return pred

    def readline(self):  # type: ignore[no-untyped-def]
        """``BufferedSubFile.readline``; a line that starts with none of the boundary
        separators the parser waits for (most lines) is handed out without asking each
        matcher (``_starts``: the separators, when every matcher is a boundary's)."""
        lines = self._lines
        if lines:
            starts = self._starts
            if starts is not None and not lines[0].startswith(starts):
                return lines.popleft()
        return super().readline()

    def push(self, data: str) -> None:
        """``BufferedSubFile.push`` without splitting the data into lines first (``_push``
        would join them again; the split was most of the cost of a large attachment): the
        complete lines go on, and what follows the last line break stays in ``_partial``,
        as the stdlib keeps it; so does a last line ending in a lone CR, whose LF may come
        with the next piece."""
        partial = self._partial
        if partial.tell():  # a partial line from the last push
            partial.write(data)
            if "\n" not in data and "\r" not in data:
                return
            text = partial.getvalue()
            partial.seek(0)
            partial.truncate()
        elif "\n" not in data and "\r" not in data:
            partial.write(data)
            return
        else:
            text = data
        if not text.endswith("\n"):
            end = len(text) - 1  # a final "\r" belongs to the partial line
            cut = max(text.rfind("\r", 0, end), text.rfind("\n", 0, end)) + 1
            partial.write(text[cut:])
            text = text[:cut]
        self._push(text, None)

    def pushlines(self, lines: list[str]) -> None:
        self._push("".join(lines), lines)

    def _push(self, text: str, lines: list[str] | None) -> None:
        """Hand the lines of ``text`` (complete lines; ``lines`` when already split) to the
        parser, each run of base64-like lines as one."""
        out: list[str] = []
        pos = 0
        for start, end in _runs(text):
            if start > pos:  # the lines between runs, split as the stdlib splits them
                out.extend(StringIO(text[pos:start], newline="").readlines())
            out.append(self._run(text[start:end], self.pos + start))
            pos = end
        if not out:
            out = lines if lines is not None else StringIO(text, newline="").readlines()
        elif pos < len(text):
            out.extend(StringIO(text[pos:], newline="").readlines())
        self.pos += len(text)
        self._lines.extend(out)

    def _run(self, run: str, start: int) -> str:
        if len(run) < _RUN_MIN:
            return run
        if not self.nonce:
            self.nonce = secrets.token_hex(8)
        ending = "\r\n" if run.endswith("\r\n") else "\n"
        self.runs.append((start, start + len(run) - len(ending)))
        return f"\x00{self.nonce}:{len(self.runs) - 1}\x00{ending}"

    def _text(self, match: re.Match[str]) -> str:
        if match.group(1) != self.nonce:  # the message's own text
            return match.group(0)
        start, end = self.runs[int(match.group(2))]
        return self.raw[start:end].decode("ascii")

    def _decode(self, payload: str) -> bytes | None:
        """The bytes the stdlib's base64 decoding gives for ``payload``, decoded run by run
        from ``raw``; None when that cannot be shown to be the same (other text between
        the runs, padding before the end, a run not a whole number of 4-character groups,
        or bad padding at the end: then the stdlib decodes the text)."""
        pieces = _PLACEHOLDER.split(payload)  # text, nonce, run number, text, ..., text
        segments: list[str | tuple[int, int]] = []
        for i, piece in enumerate(pieces):
            if i % 3 == 1:
                if piece != self.nonce:
                    return None
            elif i % 3 == 2:
                segments.append(self.runs[int(piece)])
            elif piece.strip("\r\n"):
                if not _BASE64_TEXT.fullmatch(piece):
                    return None
                segments.append(piece)
        raw, view = self.raw, memoryview(self.raw)
        out = BytesIO()
        last = len(segments) - 1
        for i, seg in enumerate(segments):
            if isinstance(seg, str):
                data: str | memoryview = seg
            else:
                start, end = seg
                data = view[start:end]
            # Whole 4-character groups without padding decode on their own to what they
            # contribute to the whole; only the last piece may end the data (so its
            # characters are not counted: most parts are one run).
            if i < last:
                if isinstance(seg, str):
                    chars = len(seg) - seg.count("\n") - seg.count("\r")
                    padded = "=" in seg
                else:
                    chars = end - start - raw.count(b"\n", start, end) - raw.count(b"\r", start, end)
                    padded = raw.find(b"=", start, end) >= 0
                if chars % 4 or padded:
                    return None
            try:
                out.write(binascii.a2b_base64(data))
            except (binascii.Error, ValueError):
                return None
        return out.getvalue()

    def settle(self, msg: Message) -> None:
        """Give every part of the tree its payload back: base64 leaves of the message itself
        decoded (kept on the part as ``_mailgw_data``, the text dropped), all else as text.
        Parts of an enclosed message keep their text: ``_flatten`` serialises it."""
        if not self.runs:
            return
        stack = [(msg, False)]
        while stack:
            part, enclosed = stack.pop()
            # A multipart's preamble and epilogue are text the feed parser kept as it came
            # (a zip's base64 after the closing boundary, say): an enclosed message is
            # serialised with them, so their runs go back too (review, session 6).
            for side in ("preamble", "epilogue"):
                text = getattr(part, side, None)
                if isinstance(text, str) and "\x00" in text:
                    setattr(part, side, _PLACEHOLDER.sub(self._text, text))
            payload = part._payload
            if isinstance(payload, list):
                inner = enclosed or part.get_content_maintype() == "message"
                stack.extend((child, inner) for child in payload if isinstance(child, Message))
                continue
            if not isinstance(payload, str) or "\x00" not in payload:
                continue
            if (not enclosed and part.get_content_maintype() not in ("multipart", "message")
                    and str(part.get("content-transfer-encoding", "")).lower() == "base64"):
                data = self._decode(payload)
                if data is not None:
                    part._mailgw_data = data
                    part._payload = ""
                    continue
            part._payload = _PLACEHOLDER.sub(self._text, payload)


class _Part(Message):
    """A ``Message`` that looks its headers up once, and splits a parameter header once.

    ``Message.get`` (and ``in``, ``get_content_type``, every parameter read) scans the
    whole header list lower-casing each name; the parser and ``parse_message`` ask a part
    for its content type about six times and for a dozen headers in all. Here the first
    look-up builds an index (lower-cased name: the first field of that name) and the
    content types worked out, kept with a copy of the header list they came from: a
    header list that no longer equals that copy (a field added, removed or replaced, by
    any path, ``replace_header`` even to an equal value) gets a new index. A value is returned as ``Message.get`` returns it: through
    the policy's ``header_fetch_parse``, which for compat32 gives a pure-ASCII string
    back as it is.

    Reading a part's charset, file name and boundary (``get_content_charset``,
    ``get_filename``, ``get_boundary``) splits and RFC 2231-decodes the same Content-Type
    header each time; that result is kept per header value (``_PARAMS``, shared by all
    parts), so a changed header is split again; a copy is handed out (it is a list)."""

    _mailgw_index: tuple[list, dict[str, tuple[str, object]], dict[str, str]] | None = None

    def _state(self) -> tuple[list, dict[str, tuple[str, object]], dict[str, str]]:
        headers = self._headers
        state = self._mailgw_index
        # list == list: the lengths, then each item by identity first (a C loop).
        if state is not None and state[0] == headers:
            return state
        index: dict[str, tuple[str, object]] = {}
        for name, value in headers:
            index.setdefault(name.lower(), (name, value))
        state = self._mailgw_index = (headers.copy(), index, {})
        return state

    def get(self, name, failobj=None):  # type: ignore[no-untyped-def]
        found = self._state()[1].get(name.lower())
        if found is None:
            return failobj
        key, value = found
        if value.__class__ is str and value.isascii() and self.policy.__class__ is policy.Compat32:
            return value  # compat32's _sanitize_header: no surrogates, the string itself
        return self.policy.header_fetch_parse(key, value)

    def __contains__(self, name):  # type: ignore[no-untyped-def]
        return name.lower() in self._state()[1]

    def replace_header(self, _name, _value):  # type: ignore[no-untyped-def]
        # The one stdlib method that changes the list in place, maybe to an equal value
        # of another type (a Header for a str): the next look-up indexes again.
        super().replace_header(_name, _value)
        self._mailgw_index = None

    def get_content_type(self) -> str:
        types = self._state()[2]
        default = self._default_type  # the answer without a Content-Type header
        ctype = types.get(default)
        if ctype is None:
            ctype = types[default] = super().get_content_type()
        return ctype

    def _get_params_preserve(self, failobj, header):  # type: ignore[no-untyped-def]
        value = self.get(header)
        if not isinstance(value, str):  # absent, or a Header object (8-bit bytes): as is
            return super()._get_params_preserve(failobj, header)
        params = _PARAMS.get(value)
        if params is None:
            params = super()._get_params_preserve(failobj, header)
            if len(value) <= _PARAMS_VALUE_MAX and "boundary" not in value.lower():
                if len(_PARAMS) >= _PARAMS_MAX:
                    _PARAMS.clear()
                _PARAMS[value] = params
        return list(params)


# The split parameters by header value (a function of the value alone): most parts of most
# mail carry one of a few Content-Type values ('text/plain; charset="utf-8"'). Bounded:
# emptied when full; long values (hostile) and those with a boundary (unique to a
# message) are not kept.
_PARAMS: dict[str, list] = {}
_PARAMS_MAX = 4096
_PARAMS_VALUE_MAX = 200


# compat32 whose parts are _Part: the same parsing, headers and serialisation.
_PARTS = policy.compat32.clone(message_factory=_Part)


_DECODE_BLOCK = 16 * 1024


def _surrogate_text(data: memoryview) -> str:
    """``bytes(data).decode("ascii", "surrogateescape")`` (what ``BytesFeedParser.feed``
    does), the same text, faster for data with 8-bit bytes: CPython decodes ASCII a word
    at a time only up to the first 8-bit byte and a byte at a time from there to the end (a
    UTF-8 text part before a 280 KB attachment: ~0.6 ms; bench/RESULTS.md, issue 8 session
    8). From the first 8-bit byte on, each ``_DECODE_BLOCK`` is decoded on its own, so only
    the blocks that have such bytes take the slow way."""
    try:
        return str(data, "ascii")
    except UnicodeDecodeError as exc:
        first = exc.start
    return "".join([str(data[:first], "ascii")] + [
        str(data[i : i + _DECODE_BLOCK], "ascii", "surrogateescape")
        for i in range(first, len(data), _DECODE_BLOCK)])


def _parse_tree(raw: bytes, start: int = 0) -> Message:
    """``email.message_from_bytes(raw[start:], policy=compat32)``, in less memory.

    The stdlib decodes the whole message to one string first and feeds that in 8 KB pieces;
    here the bytes are decoded a megabyte at a time (ASCII with surrogate escapes maps byte
    to character, so the pieces join to the same text) through ``_RunBuffer``. The parts
    read the same (tests/test_parse_lean.py).
    """
    parser = BytesFeedParser(policy=_PARTS)
    buffer = _RunBuffer(raw, start)
    parser._input = buffer  # read by the parser's generator on each step
    view = memoryview(raw)
    feed = super(BytesFeedParser, parser).feed  # the text parser's: BytesFeedParser decodes
    for pos in range(start, len(raw), _FEED_CHUNK):
        feed(_surrogate_text(view[pos : pos + _FEED_CHUNK]))
    msg = parser.close()
    buffer.settle(msg)
    return msg


def parse_message(raw: bytes) -> ParsedMail:
    """Parse one message. Raises ParseError only when ``looks_like_mail(raw)`` is False."""
    raw = bytes(raw) if isinstance(raw, (bytearray, memoryview)) else raw
    start = _header_start(raw) if isinstance(raw, bytes) else -1
    if start < 0:
        raise ParseError("not an email message: no RFC 5322 header block")
    if start:
        raw = raw[start:]
    try:
        msg = _parse_tree(raw)
        return _build(msg, [], _body_and_attachments)
    except Exception as exc:  # RecursionError on absurd nesting, or a stdlib bug on hostile input
        # Degrade rather than drop the customer's message: headers only, body as raw text.
        defects = [f"MIME structure not parsed ({type(exc).__name__}); body kept as raw text"]
    try:
        msg = BytesParser(policy=policy.compat32).parsebytes(raw, headersonly=True)
        return _build(msg, defects, _raw_body_as_text)
    except Exception as exc:
        defects.append(f"headers not parsed ({type(exc).__name__}); whole message kept as text")
        return _minimal(raw, defects)
