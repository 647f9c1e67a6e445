"""A lighter SMTP load generator and acknowledgement sink for the benchmarks (issue 8).

``smtp_bench.py``'s default client is eight ``smtplib`` sessions in eight threads, its
sink an aiosmtpd ``Controller`` and its commit watcher SQLAlchemy: together 0.7-0.9 ms of
CPU a message on the two cores the gateway needs. This module has the cheaper versions
(``smtp_bench.py --client lean|pipelined``, ``floor.py``):

- ``send_all``: every session in one asyncio loop (one thread), the ``DATA`` payload made
  once before the clock starts (``wire_data``: exactly what ``smtplib.SMTP.data`` sends, so
  the gateway receives the same bytes), replies read with one ``readuntil`` a line.
  ``pipeline=False``: one command, one reply (RFC 5321 lock-step, what smtplib does).
  ``pipeline=True``: RFC 2920 groups: ``MAIL``, ``RCPT``, ``DATA`` in one write, and the
  message content followed by the next message's group in the next one, so a message costs
  one write and two waits instead of four of each. RFC 2920 allows it only when the server
  advertises ``PIPELINING``: ``mailgw run`` does (decision 30; plain aiosmtpd 1.4.6 does
  not, and against such a server it is forced: ``forced_pipelining`` tells).
- ``LeanSink``: an ``asyncio.Protocol`` SMTP sink, no aiosmtpd: commands by a dict look-up,
  ``DATA`` found by one ``find`` of ``CRLF.CRLF`` per received chunk, only the header block
  searched for ``In-Reply-To``. Same EHLO extensions as aiosmtpd (the gateway's sender
  decides by them). ``acked`` as ``smtp_bench.AckSink``.

Both run on uvloop when it is installed, as ``mailgw run`` does (decision 37), unless
``BENCH_CLIENT_LOOP=asyncio``: the load generator's CPU is on the same two cores.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import Callable, Sequence

QUEUED = re.compile(rb"queued as (\d+)")
IN_REPLY_TO = re.compile(rb"^In-Reply-To:\s*<([^>]+)>", re.M | re.I)
_LEADING_DOT = re.compile(rb"(?m)^\.")


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed (and not ``BENCH_CLIENT_LOOP=asyncio``), else asyncio's."""
    if os.environ.get("BENCH_CLIENT_LOOP", "").strip().lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def wire_data(raw: bytes) -> bytes:
    """The bytes ``smtplib.SMTP.data(raw)`` writes after the ``354`` for a ``bytes`` message:
    leading dots doubled (smtplib's ``_quote_periods``: after CRLF and after a bare LF), a
    CRLF added if the message does not end with one, then ``.`` CRLF. Line ends are left as
    they are (smtplib converts them only for ``str``)."""
    q = _LEADING_DOT.sub(b"..", raw)
    if q[-2:] != b"\r\n":
        q += b"\r\n"
    return q + b".\r\n"


class SmtpReplyError(Exception):
    pass


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One (possibly multi-line) reply: its code and its last line."""
    while True:
        line = await reader.readuntil(b"\r\n")
        if line[3:4] != b"-":
            return int(line[:3]), line


async def _session(host: str, port: int, items: Sequence[tuple[str, bytes]], mail_from: str,
                   rcpt: str, pipeline: bool, on_queued: Callable[[str, bytes, float], None],
                   pace: Callable[[int], float] | None, info: dict) -> None:
    """One SMTP session sending ``items`` ([(Message-ID, wire_data)]) one after another."""
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    try:
        code, line = await _reply(reader)
        if code != 220:
            raise SmtpReplyError(f"greeting {line!r}")
        writer.write(b"EHLO bench.test\r\n")
        caps = []
        while True:
            line = await reader.readuntil(b"\r\n")
            caps.append(line[4:].strip().upper())
            if line[3:4] != b"-":
                break
        if int(line[:3]) != 250:
            raise SmtpReplyError(f"EHLO {line!r}")
        info["pipelining_advertised"] = b"PIPELINING" in caps
        group = (f"MAIL FROM:<{mail_from}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n").encode()
        mail, rcpt_cmd, data_cmd = (x + b"\r\n" for x in group.split(b"\r\n")[:3])
        n = len(items)
        chained = pipeline and pace is None  # content + next group in one write
        if chained and n:
            writer.write(group)
        for j, (mid, wire) in enumerate(items):
            if pace is not None:
                delay = pace(j) - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            if not chained:
                if pipeline:
                    writer.write(group)
                else:
                    writer.write(mail)
                    code, line = await _reply(reader)
                    if code != 250:
                        raise SmtpReplyError(f"MAIL {line!r}")
                    writer.write(rcpt_cmd)
                    code, line = await _reply(reader)
                    if code != 250:
                        raise SmtpReplyError(f"RCPT {line!r}")
                    writer.write(data_cmd)
            if pipeline:
                for what in ("MAIL", "RCPT"):
                    code, line = await _reply(reader)
                    if code != 250:
                        raise SmtpReplyError(f"{what} {line!r}")
            code, line = await _reply(reader)
            if code != 354:
                raise SmtpReplyError(f"DATA {line!r}")
            if chained and j + 1 < n:
                writer.write(wire + group)
            else:
                writer.write(wire)
            code, line = await _reply(reader)
            t = time.time()
            if code != 250:
                raise SmtpReplyError(f"end of data {line!r}")
            on_queued(mid, line, t)
        writer.write(b"QUIT\r\n")
        await _reply(reader)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


def send_all(host: str, port: int, corpus: Sequence[tuple[str, bytes]], *, connections: int = 8,
             pipeline: bool = False, mail_from: str = "bench@customer.test",
             rcpt: str = "support@example.com",
             on_queued: Callable[[str, bytes, float], None] | None = None,
             rate: float = 0.0, t0: float | None = None, wired: bool = False) -> dict:
    """Send ``corpus`` ([(Message-ID, raw)]) over ``connections`` sessions in one asyncio
    loop (in the calling thread), message ``k + j * connections`` on session ``k`` as
    smtp_bench's smtplib clients do. ``on_queued(message_id, reply_line, t)`` is called for
    each ``250`` after the content. ``rate``: offer that many messages a second from ``t0``
    (pipelining then stays within a message). ``wired``: ``corpus`` holds ``wire_data``
    already. Returns ``{"pipelining_advertised": bool}``; raises on any unexpected reply."""
    items = [(mid, raw if wired else wire_data(raw)) for mid, raw in corpus]
    chunks = [items[k::connections] for k in range(connections)]
    info: dict = {}
    cb = on_queued or (lambda mid, line, t: None)
    start = time.time() if t0 is None else t0

    def pace_for(k: int) -> Callable[[int], float] | None:
        if not rate:
            return None
        return lambda j: start + (k + j * connections) / rate

    async def main() -> None:
        await asyncio.gather(*(_session(host, port, c, mail_from, rcpt, pipeline, cb,
                                        pace_for(k), info)
                               for k, c in enumerate(chunks) if c))

    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(main())
    return info


# --- the sink -----------------------------------------------------------------------------

_EHLO = (b"250-%s\r\n250-SIZE 33554432\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 HELP\r\n")
_SIMPLE = {b"MAIL": b"250 OK\r\n", b"RCPT": b"250 OK\r\n", b"RSET": b"250 OK\r\n",
           b"NOOP": b"250 OK\r\n", b"HELO": b"250 sink\r\n"}


class _SinkProtocol(asyncio.Protocol):
    def __init__(self, sink: LeanSink) -> None:
        self.sink = sink
        self.buf = b""
        self.in_data = False
        self.scan = 0  # where to look for the end of data in buf

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport
        transport.write(b"220 sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        out = []
        while buf:
            if self.in_data:
                # The content began right after "DATA\r\n", so its end is "\r\n.\r\n" or,
                # for an empty message, "." CRLF at its very start.
                if buf.startswith(b".\r\n"):
                    end, content = 3, b""
                else:
                    i = buf.find(b"\r\n.\r\n", self.scan)
                    if i < 0:
                        self.scan = max(0, len(buf) - 4)  # a large message: no rescan
                        break
                    end, content = i + 5, buf[:i + 2]
                self.scan = 0
                t = time.time()
                head_end = content.find(b"\r\n\r\n")
                hit = IN_REPLY_TO.search(content, 0, head_end if head_end >= 0 else len(content))
                if hit:
                    self.sink.acked[hit.group(1).decode()] = t
                self.sink.messages += 1
                self.in_data = False
                buf = buf[end:]
                out.append(b"250 OK\r\n")
                continue
            i = buf.find(b"\r\n")
            if i < 0:
                break
            line, buf = buf[:i], buf[i + 2:]
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(_EHLO % b"sink")
            elif verb == b"DATA":
                self.in_data = True
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                out.append(b"221 Bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                self.buf = b""
                return
            else:
                out.append(_SIMPLE.get(verb, b"502 Command not implemented\r\n"))
        self.buf = buf
        if out:
            self.transport.write(b"".join(out))


class LeanSink:
    """An SMTP sink on 127.0.0.1 in a thread of its own (``start``/``stop``, ``port``):
    ``acked`` maps the Message-ID in each message's ``In-Reply-To`` to when it arrived."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.acked: dict[str, float] = {}
        self.messages = 0
        self.thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            loop = self._loop = new_loop()
            server = loop.run_until_complete(loop.create_server(
                lambda: _SinkProtocol(self), self.host, self.port))
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            server.close()
            loop.run_until_complete(server.wait_closed())
            loop.close()

        self.thread = threading.Thread(target=run, name="lean-sink", daemon=True)
        self.thread.start()
        ready.wait(10)

    def stop(self) -> None:
        if self._loop is not None and self.thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self.thread.join(10)
