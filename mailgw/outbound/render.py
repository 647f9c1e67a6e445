"""Render mail templates and build outgoing messages.

A template is a Jinja2 file in ``templates/`` with two blocks, ``subject`` and ``body``.
Templates are compiled once (Jinja2 caches them in the Environment) and rendered with
``StrictUndefined``, so a typo in a variable is an error in ``config check`` and in tests, not
a blank in a customer's mail.
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email import base64mime as _base64mime
from email import quoprimime as _quoprimime
from email.charset import QP, SHORTEST, Charset
from email.charset import RFC2047_CHROME_LEN as _RFC2047_CHROME_LEN
from email.header import Header
from email.message import Message
from email.policy import compat32
from email.quoprimime import _QUOPRI_HEADER_MAP
from email.utils import format_datetime, formataddr
from itertools import accumulate
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, Template, TemplateError
from jinja2.runtime import new_context

from mailgw.types import Attachment

REQUIRED = ("ack_new", "ack_followup", "reject_closed")
# Needed once agent mail is on (agent_mail.keys set; docs/agent-mail.md).
AGENT_MAIL = ("agent_new_ticket", "agent_followup", "agent_refused", "agent_pending_reminder")


@dataclass(frozen=True)
class Rendered:
    subject: str
    body: str


class Renderer:
    def __init__(self, template_dir: Path):
        self.env = Environment(
            loader=FileSystemLoader(str(template_dir)),
            undefined=StrictUndefined,
            autoescape=False,  # plain-text mail
            keep_trailing_newline=True,
            auto_reload=False,
        )
        # name -> (template, its globals as one dict): see render.
        self._loaded: dict[str, tuple[Template, dict[str, Any]]] = {}

    def render(self, name: str, context: dict[str, Any]) -> Rendered:
        loaded = self._loaded.get(name)
        if loaded is None:
            tmpl = self.env.get_template(f"{name}.j2")
            if "subject" not in tmpl.blocks or "body" not in tmpl.blocks:
                raise TemplateError(f"template {name}.j2 needs a 'subject' and a 'body' block")
            # auto_reload is off, so the Environment would hand out this same template every
            # time. Its globals are a ChainMap (the template's over the environment's, which
            # nothing changes after this point); ``Template.new_context`` copies them into a
            # dict and a set of keys on every render, walking the ChainMap each time (about
            # half of rendering an acknowledgement: bench/RESULTS.md, issue 8 session 8).
            # Flattened once here, the context is the same one new_context builds.
            loaded = self._loaded[name] = (tmpl, dict(tmpl.globals))
        tmpl, tglobals = loaded
        ctx = new_context(self.env, tmpl.name, tmpl.blocks, context, False, tglobals)
        subject = "".join(tmpl.blocks["subject"](ctx)).strip()
        body = "".join(tmpl.blocks["body"](ctx)).strip("\n") + "\n"
        # A header must be one line: a template must not be able to inject headers.
        subject = " ".join(subject.split())
        return Rendered(subject, body)

    def check(self, also: tuple[str, ...] = ()) -> list[str]:
        """Compile every template (``also``: more names to insist on); returns problems as
        ``file:line: reason``."""
        errors = []
        for name in REQUIRED + also:
            try:
                tmpl = self.env.get_template(f"{name}.j2")
                if "subject" not in tmpl.blocks or "body" not in tmpl.blocks:
                    errors.append(f"templates/{name}.j2: needs a 'subject' and a 'body' block")
            except TemplateError as exc:
                line = getattr(exc, "lineno", None)
                where = f"templates/{name}.j2" + (f":{line}" if line else "")
                errors.append(f"{where}: {exc.message or exc}")  # type: ignore[attr-defined]
        return errors


def make_message_id(hostname: str, ticket_id: int | None) -> str:
    """A new bare Message-ID of ours (RFC 5322 3.6.4): unique, with our host on the right."""
    return f"mailgw.{ticket_id or 0}.{int(time.time())}.{secrets.token_hex(6)}@{hostname}"


def build_message(
    *,
    from_addr: str,
    from_name: str | None,
    to: list[str],
    subject: str,
    body: str,
    message_id: str,
    in_reply_to: str | None,
    references: list[str],
    extra_headers: dict[str, str],
    attachments: list[Attachment] | None = None,
) -> bytes:
    # The compat32 Message API, not EmailMessage: EmailMessage builds a header class for every
    # header it sets and costs about 3 ms a mail, a quarter of a message's processing (see
    # bench/RESULTS.md); this makes the same bytes' meaning in a tenth of the time.
    headers: list[tuple[str, str | Header]] = [
        ("From", formataddr((from_name, from_addr), charset="utf-8") if from_name else from_addr),
        ("To", ", ".join(to)),
        ("Subject", _header(subject)),
        ("Date", _date_now()),
        ("Message-ID", f"<{message_id}>"),
    ]
    if in_reply_to:
        headers.append(("In-Reply-To", f"<{in_reply_to}>"))
    if references:
        headers.append(("References", " ".join(f"<{r}>" for r in references)))
    for name, value in extra_headers.items():
        headers.append((name, _header(value, name)))
    headers.append(("MIME-Version", "1.0"))
    if _DIRECT and not attachments and body.isascii():
        # What _set_text and _flatten make of a Message with these headers (compat32's
        # __setitem__ only appends them), without building the Message.
        headers.append(("Content-Type", 'text/plain; charset="utf-8"'))
        headers.append(("Content-Transfer-Encoding", "7bit"))
        return _flatten_items(headers, body.replace("\r\n", "\n").replace("\n", "\r\n"))
    if _DIRECT and not attachments and _MIME_HEADERS.isdisjoint(
            name.lower() for name in extra_headers):
        # Non-ASCII text (every acknowledgement: the templates' signature has a "·"):
        # set_payload(body, _UTF8_QP) stores the quoted-printable body and, through
        # set_charset, appends Content-Type and Content-Transfer-Encoding, which it only
        # does when the message has none (hence the check above; MIME-Version is there).
        headers.append(("Content-Type", 'text/plain; charset="utf-8"'))
        headers.append(("Content-Transfer-Encoding", "quoted-printable"))
        return _flatten_items(headers, _qp_body(body))
    msg = Message()
    for name, value in headers:
        msg[name] = value
    if attachments:
        # multipart/mixed: the text first, then each attachment as it came (agent replies).
        msg["Content-Type"] = "multipart/mixed"
        text = Message()
        _set_text(text, body)
        del text["MIME-Version"]  # set_payload's charset adds one; it belongs on top only
        msg.attach(text)
        for att in attachments:
            msg.attach(_attachment_part(att))
        return msg.as_bytes(policy=_WIRE)
    _set_text(msg, body)
    return _flatten(msg)


# build_message writes a single-part ASCII text mail without a Message object (False: always
# through Message and _flatten; tests/test_render_fast.py compares the two).
_DIRECT = True


def _date_now() -> str:
    """``format_datetime(datetime.now(UTC))``, made once a second (it shows whole seconds):
    a busy sweep or worker builds many mails in the same second."""
    global _date_cache
    second = int(time.time())
    cached = _date_cache
    if cached[0] != second:
        cached = _date_cache = (second, format_datetime(datetime.fromtimestamp(second, UTC)))
    return cached[1]


_date_cache: tuple[int, str] = (-1, "")


def _flatten(msg: Message) -> bytes:
    """``msg.as_bytes(policy=_WIRE)`` for a single-part message, the same bytes, faster.

    The generator folds every header through ``email.header.Header`` (most of a notice's or
    an acknowledgement's cost, bench/RESULTS.md). A header whose ``Name: value`` line is
    printable ASCII without edge whitespace and fits in 78 characters comes out of that
    folding unchanged, so it is written as it is; every other header (RFC 2047, long, odd
    whitespace, a ``Header`` object) still goes through the policy's own ``fold_binary``,
    and so does the body's line-ending conversion (``NLCRE``, as ``_write_lines``).
    tests/test_render_fast.py checks the bytes against ``as_bytes`` for all of these."""
    payload = msg._payload  # what the generator writes; a str for a single part
    if not isinstance(payload, str) or not payload.isascii():
        return msg.as_bytes(policy=_WIRE)  # surrogate-escaped 8-bit: the generator's case
    return _flatten_items(msg.raw_items(), payload)


def _flatten_items(headers: Iterable[tuple[str, Any]], payload: str) -> bytes:
    """The generator's output for these headers and an ASCII ``payload`` (see _flatten)."""
    out = []
    for name, value in headers:
        if isinstance(value, str) and value.isascii():
            if (len(name) + len(value) <= _MAX_PLAIN and value.isprintable()
                    and value == value.strip()):
                out.append(f"{name}: {value}\r\n".encode("ascii"))
                continue
            if _PLAIN_ASCII.fullmatch(value):
                folded = _fold_ascii(name, value)
                if folded is not None:
                    out.append(folded)
                    continue
        elif value.__class__ is _TextHeader:
            folded = _fold_text(name, value)
            if folded is not None:
                out.append(folded)
                continue
        out.append(_WIRE.fold_binary(name, value))
    out.append(b"\r\n")
    # "\r\n".join(NLCRE.split(payload)), as the generator's _write_lines: every CRLF, lone
    # CR and lone LF becomes CRLF (replace is a tenth of the regex split's cost).
    out.append(payload.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
               .encode("ascii"))
    return b"".join(out)


def _fold_ascii(name: str, value: str) -> bytes | None:
    """``_WIRE.fold_binary(name, value)`` for a value of printable ASCII and tabs: the same
    bytes, without ``email.header``'s cost (its line accumulator sums its parts' lengths on
    every word, quadratic in the words of a line).

    The steps of ``Header.encode`` for one US-ASCII chunk without line breaks, as
    ``_ValueFormatter`` and ``_Accumulator`` do them: the value is split into (whitespace,
    word) pairs; the pairs are added to the current line, and when the line (with the
    header's ``Name: `` on the first) is longer than 78 characters it is broken before the
    last pair whose preceding word ends in ``;``, else ``,``, else whose whitespace starts
    with a space, else a tab; a line that is one pair only stays long (on the first line
    that pair moves to its own line, after the header name). Then a transition ``(' ', '')``
    is pushed and the last line ended. None when the result is one the email package would
    refuse (an embedded header); the caller then lets it raise.
    tests/test_render_fast.py compares it with ``fold_binary`` on thousands of values."""
    if _SIMPLE.fullmatch(value):
        return _fold_words(name, value)
    parts = _FWS_RUN.split(value)
    if parts[0]:
        parts.insert(0, "")
    else:
        del parts[0]
    lines: list[str] = []
    cur: list[tuple[str, str]] = []
    initial = size = len(name) + 2  # the accumulator's length: header name on line one

    def newline() -> None:
        nonlocal size, initial
        end = cur.pop() if cur else ("", "")
        if end == (" ", ""):
            size -= 1
        else:
            cur.append(end)
        if size > 0:
            text = "".join(f + w for f, w in cur)
            if initial == 0 and text.isspace() and lines:
                lines[-1] += text
            else:
                lines.append(text)
        cur.clear()
        initial = size = 0

    for j in range(0, len(parts), 2):
        fws, word = parts[j], parts[j + 1]
        cur.append((fws, word))
        size += len(fws) + len(word)
        if size <= _WIRE.max_line_length:
            continue
        split = 0
        for ch in _SPLITCHARS:
            for i in range(len(cur) - 1, 0, -1):
                if ch in " \t":
                    f = cur[i][0]
                    if f and f[0] == ch:
                        break
                prev = cur[i - 1][1]
                if prev and prev[-1] == ch:
                    break
            else:
                continue
            split = i
            break
        if split:
            lines.append("".join(f + w for f, w in cur[:split]))
            del cur[:split]
            initial = 0
            size = sum(len(f) + len(w) for f, w in cur)
            continue
        # one pair only, too long for any line
        cur.pop()
        size -= len(fws) + len(word)
        if initial > 0:
            newline()
            if not fws:
                fws = " "
        cur.append((fws, word))
        size += len(fws) + len(word)
    cur.append((" ", ""))  # Header.encode's closing transition
    size += 1
    newline()
    folded = _WIRE.linesep.join(lines)
    if _EMBEDDED_HEADER.search(folded):
        return None
    return f"{name}: {folded}{_WIRE.linesep}".encode("ascii")


def _fold_words(name: str, value: str) -> bytes:
    """_fold_ascii for words separated by single spaces, without ``;``, ``,`` or tabs (most
    subjects): a line is only ever broken before the word that makes it too long (the
    space before it is the only split point); a first word too long for the header line
    goes to its own line."""
    maxlen = _WIRE.max_line_length
    words = value.split(" ")
    first = words[0]
    size = len(name) + 2 + len(first)
    lines: list[str] = []
    if size > maxlen:
        lines.append("")
        line, size = " " + first, 1 + len(first)
    else:
        line = first
    for word in words[1:]:
        size += 1 + len(word)
        if size > maxlen:
            lines.append(line)
            line, size = " " + word, 1 + len(word)
        else:
            line += " " + word
    lines.append(line)
    sep = _WIRE.linesep
    return f"{name}: {sep.join(lines)}{sep}".encode("ascii")


def _set_text(msg: Message, body: str) -> None:
    if body.isascii():
        msg["Content-Type"] = 'text/plain; charset="utf-8"'
        msg["Content-Transfer-Encoding"] = "7bit"
        msg.set_payload(body.replace("\r\n", "\n").replace("\n", "\r\n"))
    else:
        msg.set_payload(body, _UTF8_QP)


def _attachment_part(att: Attachment) -> Message:
    part = Message()
    maintype, _, subtype = (att.content_type or "application/octet-stream").partition("/")
    part["Content-Type"] = f"{maintype or 'application'}/{subtype or 'octet-stream'}"
    if att.filename:
        # RFC 2231 for names that are not ASCII.
        part.set_param("name", att.filename if att.filename.isascii()
                       else ("utf-8", "", att.filename))
    disposition = "inline" if att.disposition == "inline" else "attachment"
    part["Content-Disposition"] = disposition
    if att.filename:
        part.set_param("filename", att.filename if att.filename.isascii()
                       else ("utf-8", "", att.filename), header="Content-Disposition")
    if att.content_id:
        part["Content-ID"] = f"<{att.content_id.strip('<>')}>"
    part["Content-Transfer-Encoding"] = "base64"
    part.set_payload(base64.encodebytes(att.data).decode("ascii").replace("\n", "\r\n"))
    return part


_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP


def _qp_body(body: str) -> str:
    """``_UTF8_QP.body_encode(body)``, the same text, in a fraction of the time.

    ``Charset.body_encode`` turns the text into pseudo-bytes (its UTF-8 as Latin-1) and
    ``quoprimime.body_encode`` maps each of them through ``str.translate`` with a list of 256
    strings, one lookup per character (most of an acknowledgement's body encoding, bench/
    RESULTS.md issue 8 session 7). Here the characters the map changes (controls but tab,
    CR and LF; ``=``; DEL and the 8-bit ones: ``_QP_CHANGED``, read from the map itself) are
    found by a regular expression and replaced with the map's own strings; the rest of
    ``body_encode`` (its soft line breaks, the trailing whitespace) is the stdlib's, line for
    line. tests/test_render_fast.py compares the two on random texts."""
    if not body:
        return body
    encoded = _QP_CHANGED.sub(_qp_quote, body.encode("utf-8").decode("latin1"))
    eol = "\n"
    soft_break = "=" + eol
    maxlinelen = 76
    maxlinelen1 = maxlinelen - 1
    out: list[str] = []
    append = out.append
    for line in encoded.splitlines():
        start = 0
        laststart = len(line) - 1 - maxlinelen
        while start <= laststart:
            stop = start + maxlinelen1
            if line[stop - 2] == "=":
                append(line[start:stop - 1])
                start = stop - 2
            elif line[stop - 1] == "=":
                append(line[start:stop])
                start = stop - 1
            else:
                append(line[start:stop] + "=")
                start = stop
        if line and line[-1] in " \t":
            room = start - laststart
            if room >= 3:
                q = _quoprimime.quote(line[-1])
            elif room == 2:
                q = line[-1] + soft_break
            else:
                q = soft_break + _quoprimime.quote(line[-1])
            append(line[start:-1] + q)
        else:
            append(line[start:])
    if encoded[-1] in "\r\n":
        append("")
    return eol.join(out)


_QP_ENCODE_MAP = _quoprimime._QUOPRI_BODY_ENCODE_MAP
_QP_CHANGED = re.compile("[" + "".join(re.escape(chr(c)) for c in range(256)
                                       if _QP_ENCODE_MAP[c] != chr(c)) + "]")


def _qp_quote(match: re.Match[str]) -> str:
    return _QP_ENCODE_MAP[ord(match.group())]
# RFC 5322 on the wire: CRLF line ends, headers folded at 78 characters.
_WIRE = compat32.clone(linesep="\r\n", max_line_length=78)
# "Name: value" fits one line: the name, ": " and the value within max_line_length.
_MAX_PLAIN = 78 - 2


# Values _fold_ascii folds: printable ASCII and tabs (no line breaks, no other controls).
_PLAIN_ASCII = re.compile(r"[\t\x20-\x7e]*")
_FWS_RUN = re.compile(r"([ \t]+)")  # email.header's FWS
# Values _fold_words folds: printable words without ; or , separated by single spaces.
_SIMPLE = re.compile(r"[!-+\--:<-~]+(?: [!-+\--:<-~]+)*")
_SPLITCHARS = ";, \t"  # Header.encode's default split characters, in order of preference
_EMBEDDED_HEADER = re.compile(r"\n[^ \t]+:")  # what Header.encode refuses


class _Utf8HeaderCharset(Charset):
    """``Charset("utf-8")`` whose ``header_encode_lines`` is linear in the value's length.

    The stdlib's joins and re-encodes the whole line so far for every character to learn
    its encoded length (quadratic; two thirds of building an acknowledgement with a
    non-ASCII subject, bench/RESULTS.md issue 8 session 5). Here each character's share of
    the encoded length is listed once (base64: its UTF-8 bytes, the line's length a
    function of their count; quoted-printable: the sum of its bytes' encoded lengths), and
    each line's end is found by bisection in the running sums: a line ends before the first
    character that makes it too long, and holds at least the character it starts with
    (the stdlib's loop only breaks a line before the character that overflows it); on the
    first line that may be none (the stdlib's ``None``: start on the next line). The
    encoder is chosen as the stdlib's ``_get_encoder`` chooses it (the shorter; the
    quoted-printable length counted with ``bytes.translate``). The lines, where they break
    and the encoder chosen are the same (tests/test_render_fast.py compares the folded
    headers on random values)."""

    def header_encode_lines(self, string, maxlengths):  # type: ignore[no-untyped-def]
        codec = self.output_codec or "us-ascii"
        if codec != "utf-8":  # the shares below are UTF-8's
            return super().header_encode_lines(string, maxlengths)
        data = string.encode(codec)
        if self.header_encoding == SHORTEST:  # _get_encoder, without its per-byte sum
            qp_length = len(data) + 2 * len(data.translate(None, _QP_PLAIN))
            encoder_module = _base64mime if _base64mime.header_length(data) < qp_length else _quoprimime
        else:
            encoder_module = self._get_encoder(data)
        encode = encoder_module.header_encode
        extra = len(self.get_output_charset()) + _RFC2047_CHROME_LEN
        base64 = encoder_module is _base64mime
        if not string:
            return [encode(data, charset=codec)]
        if base64:  # UTF-8 bytes per character
            shares = [1 if c < "\x80" else 2 if c < "\u0800" else 3 if c < "\U00010000" else 4
                      for c in string]
        else:  # every byte of a non-ASCII character is "=XX"
            shares = [_QP_LENGTH[ord(c)] if c < "\x80" else 6 if c < "\u0800" else
                      9 if c < "\U00010000" else 12 for c in string]
        sums = list(accumulate(shares, initial=0))  # sums[i]: the share of string[:i]
        n = len(string)
        lines: list[str | None] = []
        start = 0
        forced = False  # the line holds string[start] whether it fits or not
        maxlen = next(maxlengths) - extra
        while True:
            # The most a line may take: base64's length is (bytes + 2) // 3 * 4.
            most = maxlen // 4 * 3 if base64 else maxlen
            end = bisect_right(sums, sums[start] + most) - 1  # string[start:end] fits
            if forced:
                end = max(end, start + 1)
            if end >= n:
                break
            if end <= start:  # the first line, too short for the first character
                lines.append(None)
            else:
                lines.append(encode(string[start:end].encode(codec), charset=codec))
                start = end
            forced = True
            maxlen = next(maxlengths) - extra
        lines.append(encode(string[start:].encode(codec), charset=codec))
        return lines


_UTF8_HEADER = _Utf8HeaderCharset("utf-8")
_QP_LENGTH = [len(_QUOPRI_HEADER_MAP[b]) for b in range(256)]
# The bytes quoted-printable header encoding writes as one character (a space as "_").
_QP_PLAIN = bytes(b for b in range(256) if _QP_LENGTH[b] == 1)
# Headers set_charset adds itself only when absent: extra headers naming one take the
# Message path.
_MIME_HEADERS = frozenset({"content-type", "content-transfer-encoding", "mime-version"})


def _header(value: str, name: str = "Subject") -> str | Header:
    """An unstructured header value, RFC 2047-encoded when it is not ASCII; ``name`` makes
    its first line fit beside the field's name."""
    return value if value.isascii() else _TextHeader(value, _UTF8_HEADER, name)


class _TextHeader(Header):
    """``Header(value, charset, header_name=name)`` that keeps its arguments, so that
    ``_flatten_items`` can fold it without ``email.header``'s formatter (``_fold_text``)."""

    def __init__(self, value: str, charset: Charset, name: str) -> None:
        super().__init__(value, charset, header_name=name)
        self.mailgw_args = (value, charset, name)


def _maxlengths(first: int, rest: int) -> Iterable[int]:
    yield first
    while True:
        yield rest


def _fold_text(name: str, header: _TextHeader) -> bytes | None:
    """``_WIRE.fold_binary(name, header)``, the same bytes, for a header of one line of
    text in a charset with a header encoding (a non-ASCII subject): about half of the
    fold's cost (~25 us of ~46 a subject) is ``_ValueFormatter``'s accumulator, which for
    one such chunk only puts the charset's encoded lines one after the other: the first
    beside the field's name (None: nothing fits there, the field's line stays empty), the
    others after a space on their own lines. None: any other header (more chunks, line
    breaks, a charset without a header encoding); the caller folds it as before.
    tests/test_render_fast.py compares the bytes with ``fold_binary``'s."""
    value, charset, header_name = header.mailgw_args
    maxlen = _WIRE.max_line_length
    if (len(header._chunks) != 1 or charset.header_encoding is None or not maxlen
            or value.splitlines() != [value] or header._continuation_ws != " "):
        return None
    headerlen = len(header_name) + 2
    lines = charset.header_encode_lines(value, _maxlengths(maxlen - headerlen, maxlen - 1))
    if not lines:
        return None
    first = lines[0]
    if first is not None and headerlen + len(first) > maxlen:
        return None  # the formatter would split the line itself
    folded = _WIRE.linesep.join(["" if first is None else first]
                                + [" " + line for line in lines[1:]])
    if _EMBEDDED_HEADER.search(folded):
        return None  # Header.encode raises; let it
    return f"{name}: {folded}{_WIRE.linesep}".encode("ascii", "surrogateescape")
