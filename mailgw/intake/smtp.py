"""The SMTP and LMTP listeners (aiosmtpd).

The edge is cheap and exact: unknown recipients are refused at ``RCPT`` (550 5.1.1), an
oversized message at ``MAIL FROM SIZE=`` or during ``DATA`` (552), and ``250`` is said only
after the message's raw bytes and envelope are committed to the inbound queue. When the
commit fails the answer is ``451 4.3.0`` so the sending MTA keeps the message and retries.
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime

import aiosmtpd.smtp as _aiosmtpd_smtp
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import MISSING, SMTP, syntax
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session as SmtpSession

from mailgw.intake.pipe import LARGE, RawBuffer
from mailgw.queue import GroupCommitWriter
from mailgw.settings import Listener, Settings
from mailgw.types import Envelope

log = logging.getLogger(__name__)


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}
# (aiosmtpd's own even if this module is imported again)
_sanitized_log = getattr(_aiosmtpd_smtp.sanitized_log, "__wrapped__", _aiosmtpd_smtp.sanitized_log)


def _sanitized_log_if_enabled(func, msg, *args, **kwargs):  # type: ignore[no-untyped-def]
    """aiosmtpd's ``sanitized_log`` (an AUTH line's secret starred), called only when the
    logger would log at that level. aiosmtpd logs every command line twice (debug and
    info) through it, and it sanitized the line each time before the log call found the
    level off: 5-6 us a command, 1.2-1.6 us so (bench/RESULTS.md, issue 8 session 8).
    What is logged is unchanged."""
    try:
        if not func.__self__.isEnabledFor(_LEVELS[func.__name__]):
            return
    except (AttributeError, KeyError):  # not a Logger's method: as aiosmtpd does
        pass
    _sanitized_log(func, msg, *args, **kwargs)


# Module-wide: aiosmtpd's session loop (SMTP._handle_client) looks the name up at each call.
_sanitized_log_if_enabled.__wrapped__ = _sanitized_log  # type: ignore[attr-defined]
_aiosmtpd_smtp.sanitized_log = _sanitized_log_if_enabled


class IntakeHandler:
    def __init__(self, settings: Settings, writer: GroupCommitWriter, source: str):
        self.settings = settings
        self.writer = writer
        self.source = source
        self.in_flight = 0

    async def handle_EHLO(self, server: SMTP, session: SmtpSession, envelope: SmtpEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        # RFC 2920 command pipelining: a client may send MAIL, RCPT and DATA (and after the
        # data the next message's commands) without waiting for each reply. The session reads
        # its commands from a stream buffer and answers them in order, one by one; the DATA
        # reader leaves what follows the end of data in that buffer (tests/test_hot_path.py).
        # LMTP servers must offer it (RFC 2033 4.1). Postfix and other MTAs use it when
        # offered: three waits and writes a message fewer on both sides.
        session.host_name = hostname  # what aiosmtpd does without this hook
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_RCPT(self, server: SMTP, session: SmtpSession, envelope: SmtpEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        if self.settings.queue_for_recipient(address) is None and not _our_verp(self.settings, address):
            return f"550 5.1.1 <{address}>: no help desk queue here for this recipient"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: SmtpSession,
                          envelope: SmtpEnvelope) -> str:
        raw = envelope.original_content or b""
        peer = session.peer
        env = Envelope(
            raw=raw,
            # aiosmtpd lets a NUL through in addresses; the database would refuse the row.
            mail_from=(envelope.mail_from or "").strip("<>").replace("\x00", ""),
            rcpt_tos=tuple(r.replace("\x00", "") for r in envelope.rcpt_tos),
            source=self.source,
            received_at=datetime.now(UTC),
            source_ref=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer),
        )
        self.in_flight += 1
        try:
            inbound_id = await self.writer.aput(env)
        except Exception:
            log.exception("could not store a message from %s", env.source_ref)
            status = "451 4.3.0 Temporary failure storing the message, try again later"
            return self._per_recipient(envelope, status)
        finally:
            self.in_flight -= 1
        return self._per_recipient(envelope, f"250 2.0.0 OK queued as {inbound_id}")

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd answers 500 (permanent: the sender bounces the mail) by default. A fault of
        # ours is temporary: the sending MTA should keep the message and retry.
        log.exception("SMTP session error", exc_info=error)
        return "451 4.3.0 Temporary local error, try again later"

    def _per_recipient(self, envelope: SmtpEnvelope, status: str) -> str:
        # LMTP (RFC 2033 4.2) answers DATA once per accepted recipient; SMTP once in all.
        if self.source != "lmtp":
            return status
        return "\r\n".join(f"{status} <{r}>" for r in envelope.rcpt_tos)


_END = b"\r\n.\r\n"
# The StreamReader's limit: how much DATA is read in one piece when no line ends in a dot.
# Also the longest command line (RFC 5321 asks for 512 octets; we take far more).
READ_PIECE = 256 * 1024


class _BulkData:
    """``DATA`` read in large pieces instead of line by line.

    aiosmtpd 1.4 reads the message one line at a time (a ``readuntil`` and a debug log call
    per line): about 10 us a line, 3 ms for a 200 KB attachment, most of the intake's CPU
    (bench/RESULTS.md). This reads up to each ``.<CRLF>``, or ``READ_PIECE`` bytes when no
    line ends in a dot, and finds the end of data (RFC 5321 4.1.1.4: ``<CRLF>.<CRLF>``, the
    first CRLF being the one that ended the DATA command); then it removes the dot-stuffing
    (4.5.2). Lines of any length are accepted up to the size limit (the liberal edge). A large
    message is held once: the pieces are appended to one buffer as they come. Replies are
    aiosmtpd's.
    """

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        # Tell the intake writer a message is on its way (it may wait a moment for it to
        # share a commit: GroupCommitWriter._linger).
        writer = getattr(self.event_handler, "writer", None)
        receiving = writer is not None and hasattr(writer, "receiving")
        if receiving:
            writer.receiving += 1
        try:
            data, too_much = await self._read_data()
        finally:
            if receiving:
                writer.receiving -= 1
        limit = self.data_size_limit
        if too_much:
            await self.push("552 Error: Too much mail data")
            self._set_post_data_state()
            return
        if limit and len(data) > limit:
            await self.push("552 Error: Too much mail data")
            self._set_post_data_state()
            return
        if len(data) < LARGE:
            data = bytes(data)  # type: ignore[assignment]
        self.envelope.content = data
        self.envelope.original_content = data
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self) -> tuple[RawBuffer, bool]:
        limit = self.data_size_limit
        # The message grows in place, without dot-stuffing (undone piece by piece), so it is
        # never held twice; a large one is handed on as a RawBuffer, which the store empties
        # once the bytes are in the row (mailgw/intake/pipe.py).
        data = RawBuffer()
        size, too_much, tail = 0, False, b"\r\n"  # tail: the last bytes seen, CRLF of DATA
        before = b"\r\n"  # the two bytes before this piece (still dot-stuffed)
        while self.transport is not None:
            try:
                piece = await self._reader.readuntil(b".\r\n")
            except asyncio.CancelledError:
                log.info("connection lost during DATA")
                self._writer.close()
                raise
            except asyncio.LimitOverrunError as exc:
                # No line ending in a dot within READ_PIECE bytes: take what cannot hold
                # the start of one (exc.consumed) and go on.
                piece = await self._reader.readexactly(exc.consumed)
            size += len(piece)
            if not too_much and limit and size > limit + 5:
                too_much = True
                data = RawBuffer()
            window = tail + piece[-5:]
            end = window.endswith(_END)
            tail = window[-4:]
            if end:
                # The end marker goes ("\r\n" stays: it ends the last line), in the last
                # piece, which readuntil ended with it.
                piece = piece[:-3]
            if not too_much:
                data += _unstuff(before, piece)
                before = (before + piece[-2:])[-2:]
            if end:
                break
        return data, too_much


def _unstuff(before: bytes, piece: bytes) -> bytes:
    """``piece`` without the dots the sender doubled at the start of a line (RFC 5321 4.5.2).

    ``before`` holds the two bytes of the stream before ``piece`` (at first the CRLF that
    ended the DATA command), so a line start that falls on a piece boundary is found too.
    A leading dot is rare in mail: the copy that undoes it is made only when one is there.
    """
    if b"\r\n." not in piece and b"\r\n." not in before + piece[:2]:
        return piece
    # "\r\n." cannot overlap itself, so each doubled dot is removed exactly once; the two
    # bytes of context are unchanged by the replace and dropped again.
    return (before + piece).replace(b"\r\n.", b"\r\n")[2:]


# An address in angle brackets as nearly every client sends it: a dot-atom local part and a
# domain of dot-separated labels, ASCII, nothing else inside the brackets.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ANGLE_ADDR = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")


class _FastAddress:
    """``MAIL FROM``/``RCPT TO`` addresses of the plain form without the RFC 5322 parser.

    aiosmtpd parses every address with the ``email`` package's header parser (about half of
    a session's CPU for a small message, bench/RESULTS.md). For ``<local@domain>`` made only
    of atoms the result is known: the address as written, and the rest of the line after
    the ``>`` and its whitespace. Anything else (quotes, comments, routes, brackets, 8-bit,
    encoded words) goes to aiosmtpd's parser; tests/test_smtp_fast.py compares the two.
    """

    def _getaddr(self, arg: str):  # type: ignore[no-untyped-def]
        plain = _PLAIN_ANGLE_ADDR.match(arg)
        # "=?" may start an RFC 2047 encoded word, which the parser decodes even here.
        if plain is not None and "=?" not in plain.group(1):
            rest = arg[plain.end():]
            if rest[:1] in (" ", "\t"):
                rest = rest.lstrip()
            if not rest.startswith("("):  # a comment: the parser's to read
                addr = plain.group(1)
                limit = self.local_part_limit  # type: ignore[attr-defined]
                if limit and len(addr.rpartition("@")[0]) > limit:
                    return None, None
                return addr, rest
        return super()._getaddr(arg)  # type: ignore[misc]


class _IdleTimer:
    """The session's idle timeout without a new timer per command.

    aiosmtpd cancels its timer and makes a new one (``call_later``) for every command: three
    a message, each a heap entry the loop later discards. Here a command moves the deadline
    only; the one timer, when it fires early, waits again for what is left. A session still
    ends ``timeout`` seconds after its last command (tests/test_smtp_fast.py)."""

    _deadline = 0.0

    def _reset_timeout(self, duration: float | None = None) -> None:
        loop = self.loop  # type: ignore[attr-defined]
        when = loop.time() + (duration or self._timeout_duration)  # type: ignore[attr-defined]
        self._deadline = when
        handle = self._timeout_handle  # type: ignore[has-type]
        if handle is None or handle.cancelled() or handle.when() > when:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = loop.call_at(when, self._timeout_due)

    def _timeout_due(self) -> None:
        loop = self.loop  # type: ignore[attr-defined]
        if loop.time() < self._deadline:
            self._timeout_handle = loop.call_at(self._deadline, self._timeout_due)
            return
        self._timeout_cb()  # type: ignore[attr-defined]


def protocol_factory(listener: Listener, handler: IntakeHandler, hostname: str, lmtp: bool):
    """A factory for ``loop.create_server`` making one SMTP (or LMTP) session per client."""
    base = LMTP if lmtp else SMTP

    class Protocol(_IdleTimer, _FastAddress, _BulkData, base):  # type: ignore[valid-type, misc]
        # Liberal at the edge: RFC 5321 limits lines to 1000 octets, but real senders (Amazon
        # SES, some Outlook HTML, clients that send bare LF) exceed it, and refusing their mail
        # with a 5xx loses it. Any line fits that fits the size limit (_BulkData reads DATA in
        # pieces of this size, whatever its lines).
        line_length_limit = READ_PIECE

    def make() -> SMTP:
        return Protocol(
            handler,
            data_size_limit=listener.max_message_size,
            hostname=listener.hostname or hostname,
            decode_data=False,
            enable_SMTPUTF8=True,
            ident="mailgw",
        )

    return make


def _our_verp(settings, address: str) -> bool:  # type: ignore[no-untyped-def]
    """A bounce address of ours with a valid token (docs/machine-mail.md); forged ones get 550."""
    from mailgw.outbound.verp import signer_for

    return signer_for(settings).verp_article(address) is not None
