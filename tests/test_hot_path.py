"""The hot-path changes of the benchmarks issue (bench/RESULTS.md) keep their guarantees:

- DATA read in bulk gives the same bytes as aiosmtpd's line-by-line reader;
- ``mailgw run --workers 2`` processes every message exactly once, survives a killed worker
  process and stops its workers with it;
- the lean ``mailgw deliver`` path writes the same inbound row as the SQLAlchemy path;
- acknowledgements built with the compat32 API read back as what the template rendered.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import threading
from datetime import UTC, datetime

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
from sqlalchemy import func, select

from tests.conftest import free_port, wait_until
from tests.helpers import mail

# --- DATA in bulk -------------------------------------------------------------------------

DATA_CASES = [
    b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\nends with a dot.\r\n.\r\nx.\r\n",
    b"Subject: empty body\r\n\r\n",
    b"Subject: no final newline\r\n\r\nlast line",
    b"Subject: long line\r\n\r\n" + b"a." * 150_000 + b"\r\n.\r\n",
    b"Subject: bare LF\n\nline\n.dot after LF\n",
    b".\r\n",
]


class _Capture:
    def __init__(self) -> None:
        self.got: list[bytes] = []

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.got.append(envelope.original_content)
        return "250 2.0.0 OK"


class _Server(Controller):
    def __init__(self, make, handler, port):  # type: ignore[no-untyped-def]
        super().__init__(handler, hostname="127.0.0.1", port=port)
        self._make = make

    def factory(self):  # type: ignore[no-untyped-def]
        return self._make()


def _received(make, lmtp: bool = False) -> list[bytes]:  # type: ignore[no-untyped-def]
    handler = _Capture()
    port = free_port()
    server = _Server(lambda: make(handler), handler, port)
    server.start()
    try:
        cls = smtplib.LMTP if lmtp else smtplib.SMTP
        with cls("127.0.0.1", port, timeout=20) as s:
            s.ehlo()  # LHLO for LMTP
            for raw in DATA_CASES:  # several messages in one session
                s.mail("a@customer.test")
                s.rcpt("support@example.com")
                code, _ = s.data(raw)
                assert code == 250
    finally:
        server.stop()
    return handler.got


@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_bulk_data_reader_gives_the_same_bytes_as_aiosmtpd(lmtp):
    from mailgw.intake.smtp import protocol_factory
    from mailgw.settings import Listener

    # Given aiosmtpd's own line-by-line reader and ours, each behind a capturing handler
    listener = Listener(listen="127.0.0.1:1", max_message_size=10_000_000)

    def ours(handler):  # type: ignore[no-untyped-def]
        return protocol_factory(listener, handler, "mailgw.test", lmtp)()

    def reference(handler):  # type: ignore[no-untyped-def]
        class Liberal(SMTP):
            line_length_limit = 10_000_002

        return Liberal(handler, decode_data=False, enable_SMTPUTF8=True)

    # When the same messages (dot-stuffed by smtplib) go through both
    got = _received(ours, lmtp)
    # Then both hand the handler identical bytes, message by message
    assert got == _received(reference)
    assert got[0].startswith(b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n")
    assert b"\r\n.\r\nx.\r\n" in got[0]
    assert got[-1] == b".\r\n"


def test_bulk_data_reader_refuses_more_than_the_size_limit(home, gateway):
    home.update_config(smtp={"listen": "127.0.0.1:2525", "max_message_size": 5000})
    gateway.start()
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as s:
        s.ehlo()
        s.esmtp_features.pop("size", None)
        s.mail("a@customer.test")
        s.rcpt("support@example.com")
        # one line with no dot at its end: the reader must stop at the limit, not buffer it
        assert s.data(b"Subject: x\r\n\r\n" + b"y" * 20_000 + b"\r\n")[0] == 552
        s.rset()
        s.mail("a@customer.test")
        s.rcpt("support@example.com")
        assert s.data(b"Subject: fits\r\n\r\nsmall.\r\n")[0] == 250  # session still usable


# --- worker processes ---------------------------------------------------------------------


def _worker_pids(gateway) -> list[int]:  # type: ignore[no-untyped-def]
    return [int(p) for p in re.findall(r"worker process \d+ started \(pid (\d+)\)",
                                       gateway.output())]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(240)
def test_run_with_two_worker_processes_processes_each_message_once(home, gateway, sink):
    from mailgw.store import models as m

    # Given a gateway with two worker processes and a relay
    home.update_config(relay={"host": "127.0.0.1", "port": sink.port},
                       worker={"batch_size": 4, "poll_interval": 5})
    gateway.start("--workers", "2")
    first = _worker_pids(gateway)
    assert len(first) == 2 and gateway.proc.pid not in first

    n = 60
    raws = [mail(f"question {i}", msgid=f"q{i}@c", sender=f"user{i % 7}@customer.test")
            for i in range(n)]

    def send(chunk: list[bytes]) -> None:
        with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as s:
            for raw in chunk:
                s.sendmail("x@customer.test", ["support@example.com"], raw)

    # When mail arrives on three connections and one worker process is killed midway
    threads = [threading.Thread(target=send, args=(raws[k::3],)) for k in range(3)]
    for t in threads:
        t.start()
    os.kill(first[0], signal.SIGKILL)
    for t in threads:
        t.join()
    engine = home.engine()

    def pending() -> int:
        with engine.connect() as c:
            return c.scalar(select(func.count()).select_from(m.Inbound)
                            .where(m.Inbound.state == "pending"))

    # Then (woken through the pipe, not the 5 s poll) everything is processed exactly once,
    wait_until(lambda: pending() == 0, timeout=120, what="queue drained")
    with engine.connect() as c:
        per_inbound = c.execute(select(m.Article.inbound_id, func.count())
                                .where(m.Article.direction == "in")
                                .group_by(m.Article.inbound_id)).all()
        claimed = set(c.scalars(select(m.Inbound.claimed_by).distinct()))
        done = c.scalar(select(func.count()).select_from(m.Inbound)
                        .where(m.Inbound.state == "done"))
    engine.dispose()
    assert done == n and len(per_inbound) == n and all(k == 1 for _, k in per_inbound)
    # by worker processes, not by the gateway process itself,
    pids = {int(c.rsplit(":", 1)[1]) for c in claimed if c}
    assert pids and gateway.proc.pid not in pids
    # the killed worker was replaced,
    wait_until(lambda: len(_worker_pids(gateway)) >= 3, timeout=30, what="worker restarted")
    # every acknowledgement reached the relay once (the sender is woken through the pipe),
    assert len(sink.wait_for(n, timeout=60)) == n
    # and stopping the gateway stops its workers.
    assert gateway.stop() == 0
    assert not any(_alive(p) for p in _worker_pids(gateway))


# --- lean deliver path --------------------------------------------------------------------


def test_lean_deliver_path_writes_the_same_row_as_the_full_path(home):
    from mailgw.intake.pipe import put_lean
    from mailgw.queue import put
    from mailgw.store import models as m
    from mailgw.store.db import SCHEMA_REVISION
    from mailgw.types import Envelope

    env = Envelope(raw=b"Subject: x\r\n\r\n\xff\x00 body\r\n", mail_from="",
                   rcpt_tos=("support@example.com", "billing@example.com"), source="pipe",
                   received_at=datetime(2026, 11, 26, 21, 0, 1, 123456, tzinfo=UTC),
                   queue="billing")
    # Given a store that does not exist yet: the lean path declines, the full one creates it
    assert put_lean(home.store_url, env, SCHEMA_REVISION) is None
    engine = home.engine()  # migrated
    # and a schema at another revision makes it decline too
    assert put_lean(home.store_url, env, "not-this-revision") is None
    # When one envelope is stored by each path
    full = put(engine, env)
    lean = put_lean(home.store_url, env, SCHEMA_REVISION)
    assert lean is not None and lean != full
    # Then the two rows are the same, value for value, as the models read them
    cols = [c for c in m.Inbound.__table__.columns if c.name != "id"]
    with engine.connect() as c:
        rows = {r.id: tuple(r[1:]) for r in c.execute(
            select(m.Inbound.id, *cols).where(m.Inbound.id.in_([full, lean])))}
    engine.dispose()
    assert rows[full] == rows[lean]
    assert rows[lean][[c.name for c in cols].index("rcpt_tos")] == list(env.rcpt_tos)


# --- acknowledgements ---------------------------------------------------------------------


def test_acknowledgement_reads_back_as_rendered():
    from mailgw.mail.parse import parse_message
    from mailgw.outbound.render import build_message

    subject = "[Ticket#2026112610000001] Re: Grüße – " + " ".join(["word"] * 30)
    raw = build_message(
        from_addr="support@example.com", from_name="Exämple Support",
        to=["jürgen@customer.test"], subject=subject, body="Hallo Jürgen,\n\n> zitiert\n",
        message_id="m1@mailgw.test", in_reply_to="c1@customer.test",
        references=[f"r{i}@customer.test" for i in range(20)],
        extra_headers={"Auto-Submitted": "auto-replied", "X-Loop": "support@example.com"})
    head = raw.split(b"\r\n\r\n", 1)[0]
    # Lines stay within RFC 5322's 78 characters; CRLF throughout; 7-bit on the wire
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    assert b"\n" not in raw.replace(b"\r\n", b"") and raw.isascii()
    mail_ = parse_message(raw)
    assert mail_.subject == subject and mail_.from_name == "Exämple Support"
    assert mail_.text == "Hallo Jürgen,\n\n> zitiert\n"
    assert mail_.in_reply_to == ["c1@customer.test"] and len(mail_.references) == 20
    # an ASCII body stays readable in the raw bytes (7bit)
    plain = build_message(from_addr="s@example.com", from_name=None, to=["a@customer.test"],
                          subject="ok", body="Your ticket is closed.\n", message_id="m2@x",
                          in_reply_to=None, references=[], extra_headers={})
    assert b"Your ticket is closed.\r\n" in plain and b"7bit" in plain


def test_bulk_reader_does_not_block_the_event_loop_on_a_slow_client():
    # A client that sends half a message and stalls must not stop another client's mail.
    from mailgw.intake.smtp import protocol_factory
    from mailgw.settings import Listener

    listener = Listener(listen="127.0.0.1:1", max_message_size=1_000_000)
    handler = _Capture()
    port = free_port()
    server = _Server(lambda: protocol_factory(listener, handler, "t", False)(), handler, port)
    server.start()
    try:
        slow = smtplib.SMTP("127.0.0.1", port, timeout=10)
        slow.ehlo()
        slow.mail("a@customer.test")
        slow.rcpt("support@example.com")
        slow.putcmd("data")
        assert slow.getreply()[0] == 354
        slow.send(b"Subject: slow\r\n\r\nhalf a mess")
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as fast:
            assert fast.sendmail("b@customer.test", ["support@example.com"],
                                 b"Subject: fast\r\n\r\nok\r\n") == {}
        slow.send(b"age\r\n.\r\n")
        assert slow.getreply()[0] == 250
        slow.quit()
    finally:
        server.stop()
    assert [g.split(b"\r\n")[0] for g in handler.got] == [b"Subject: fast", b"Subject: slow"]
