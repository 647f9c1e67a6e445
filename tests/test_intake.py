"""The SMTP/LMTP edge: exact status codes, and 250 only once the message is durable."""

from __future__ import annotations

import smtplib

import pytest
from sqlalchemy import func, select, text

from tests.conftest import free_port, wait_until
from tests.test_e2e_smtp import customer_mail


def _count(home) -> int:  # type: ignore[no-untyped-def]
    from mailgw.store import models as m

    engine = home.engine()
    try:
        with engine.connect() as c:
            return c.scalar(select(func.count()).select_from(m.Inbound))
    finally:
        engine.dispose()


def test_unknown_recipient_is_refused_at_rcpt(home, gateway):
    gateway.start()
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as s:
        s.ehlo()
        s.mail("alice@customer.test")
        code, reply = s.rcpt("nobody@example.com")
        assert code == 550 and reply.startswith(b"5.1.1")
        # a served address with a +detail is accepted (RFC 5233 subaddressing)
        assert s.rcpt("support+urgent@example.com")[0] == 250


def test_oversized_message_is_refused_with_552(home, gateway):
    home.update_config(smtp={"listen": "127.0.0.1:2525", "max_message_size": 20000})
    gateway.start()
    msg = customer_mail("big", "x" * 60 + "\n" * 1 + ("y" * 70 + "\n") * 400)
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as s:
        with pytest.raises(smtplib.SMTPResponseException) as err:
            s.send_message(msg)
        assert err.value.smtp_code == 552
    assert _count(home) == 0


def test_oversized_data_without_size_parameter_is_refused_with_552(home, gateway):
    # A client that does not announce SIZE is stopped when DATA passes the limit.
    home.update_config(smtp={"listen": "127.0.0.1:2525", "max_message_size": 20000})
    gateway.start()
    raw = b"From: a@customer.test\r\nSubject: big\r\n\r\n" + b"y" * 70 + b"\r\n" * 1
    raw += (b"z" * 70 + b"\r\n") * 400
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as s:
        s.ehlo()
        s.esmtp_features.pop("size", None)  # so smtplib sends no SIZE= at MAIL FROM
        assert s.mail("a@customer.test")[0] == 250
        assert s.rcpt("support@example.com")[0] == 250
        code, _ = s.data(raw)
        assert code == 552
    assert _count(home) == 0


def test_lines_longer_than_rfc5321_are_accepted(home, gateway):
    # Real senders (Amazon SES, Outlook HTML) exceed 998 characters a line; refusing loses mail.
    gateway.start()
    body = "word " * 3000  # one 15,000-character line
    msg = customer_mail("long line", "")
    msg.set_content(body, cte="8bit")
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as s:
        assert s.send_message(msg) == {}
    wait_until(lambda: _count(home) == 1, what="stored message")


def test_bare_lf_message_of_two_megabytes_is_accepted(home, gateway):
    # A sloppy client sending bare LF makes the whole message one SMTP "line".
    gateway.start()
    raw = (b"From: a@customer.test\nTo: support@example.com\nSubject: bare LF\n\n"
           + b"0123456789abcdef\n" * 130_000)
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as s:
        assert s.sendmail("a@customer.test", ["support@example.com"], raw) == {}
    wait_until(lambda: _count(home) == 1, what="stored message")


def test_store_failure_answers_451_and_mta_retry_succeeds(home, gateway):
    # Given a running gateway whose inbound table disappears (a real store failure)
    gateway.start()
    engine = home.engine()
    with engine.begin() as c:
        c.execute(text("ALTER TABLE inbound RENAME TO inbound_away"))
    msg = customer_mail("during outage", "hello")
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as s:
        with pytest.raises(smtplib.SMTPDataError) as err:
            s.send_message(msg)
        # Then the sender is told to retry later, with the enhanced status 4.3.0
        assert err.value.smtp_code == 451
        assert err.value.smtp_error.startswith(b"4.3.0")
    # When the store is back, the retried message is accepted and stored once
    with engine.begin() as c:
        c.execute(text("ALTER TABLE inbound_away RENAME TO inbound"))
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as s:
        assert s.send_message(msg) == {}
    engine.dispose()
    assert _count(home) == 1


def test_lmtp_answers_once_per_recipient(home, gateway):
    port = free_port()
    home.update_config(lmtp={"listen": f"127.0.0.1:{port}"})
    gateway.start()
    client = smtplib.LMTP("127.0.0.1", port, timeout=10)
    try:
        client.ehlo_or_helo_if_needed()
        assert client.mail("alice@customer.test")[0] == 250
        assert client.rcpt("support@example.com")[0] == 250
        assert client.rcpt("billing@example.com")[0] == 250
        assert client.rcpt("stranger@example.com")[0] == 550
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(b"From: alice@customer.test\r\nSubject: via LMTP\r\n\r\nhi\r\n.\r\n")
        statuses = [client.getreply() for _ in range(2)]
    finally:
        client.close()
    assert [code for code, _ in statuses] == [250, 250]
    assert b"support@example.com" in statuses[0][1]
    assert b"billing@example.com" in statuses[1][1]
    wait_until(lambda: _count(home) == 1, what="stored message")


def test_client_hanging_up_during_a_slow_commit_does_not_stall_intake(home, gateway):
    # Given a store that is busy (another transaction holds the lock the intake needs)
    import socket
    import sqlite3
    import time

    import psycopg

    gateway.start()
    if home.store_url.startswith("sqlite"):
        blocker = sqlite3.connect(home.store_url.removeprefix("sqlite:///"), isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
    else:
        from sqlalchemy.engine import make_url

        u = make_url(home.store_url)
        blocker = psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database,
                                  options=u.query["options"])
        blocker.execute("LOCK TABLE inbound IN EXCLUSIVE MODE")
    # When a client sends a whole message and hangs up before the answer
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        f = sock.makefile("rwb")
        f.readline()
        for line in (b"HELO me", b"MAIL FROM:<a@customer.test>", b"RCPT TO:<support@example.com>",
                     b"DATA"):
            f.write(line + b"\r\n")
            f.flush()
            f.readline()
        f.write(b"Subject: gone\r\n\r\nbye\r\n.\r\n")
        f.flush()
        time.sleep(0.5)
        f.close()  # the socket closes only once its file object is closed too
    time.sleep(0.5)
    if home.store_url.startswith("sqlite"):
        blocker.execute("ROLLBACK")
    else:
        blocker.rollback()
    blocker.close()
    # Then the next client is still answered, and both messages are stored
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as s:
        assert s.send_message(customer_mail("after", "still here?")) == {}
    wait_until(lambda: _count(home) == 2, what="both messages stored")


def test_nul_in_the_envelope_sender_does_not_cost_the_message(home, gateway):
    gateway.start()
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as s:
        s.ehlo()
        assert s.docmd("MAIL FROM:<odd\x00one@customer.test>")[0] == 250
        assert s.rcpt("support@example.com")[0] == 250
        code, _ = s.data(b"From: odd@customer.test\r\nSubject: nul\r\n\r\nhi\r\n")
        assert code == 250
    wait_until(lambda: _count(home) == 1, what="stored message")


def _replies(f, n: int) -> list[bytes]:  # type: ignore[no-untyped-def]
    """``n`` replies (the last line of each) from a socket file."""
    out = []
    while len(out) < n:
        line = f.readline()
        assert line, f"connection closed after {out}"
        if line[3:4] != b"-":
            out.append(line.rstrip(b"\r\n"))
    return out


def test_smtp_and_lmtp_offer_pipelining_and_answer_a_pipelined_group_in_order(home, gateway):
    import socket

    lmtp_port = free_port()
    home.update_config(lmtp={"listen": f"127.0.0.1:{lmtp_port}"})
    gateway.start()
    # Given a client on each listener that sees PIPELINING offered (RFC 2920; RFC 2033 4.1)
    for port, hello in ((gateway.port, b"EHLO"), (lmtp_port, b"LHLO")):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            f = sock.makefile("rb")
            assert _replies(f, 1)[0].startswith(b"220")
            sock.sendall(hello + b" client.test\r\n")
            caps = []
            while True:
                line = f.readline()
                caps.append(line[4:].strip())
                if line[3:4] != b"-":
                    break
            assert b"PIPELINING" in caps
            # When it sends MAIL, a refused and an accepted RCPT and DATA in one write
            sock.sendall(b"MAIL FROM:<alice@customer.test>\r\nRCPT TO:<stranger@example.com>\r\n"
                         b"RCPT TO:<support@example.com>\r\nDATA\r\n")
            # Then every command is answered, in order
            codes = [r[:3] for r in _replies(f, 4)]
            assert codes == [b"250", b"550", b"250", b"354"]
            # And the content followed by the next message's group in one write
            sock.sendall(b"Subject: one\r\n\r\n.. dotted\r\n.\r\n"
                         b"MAIL FROM:<bob@customer.test>\r\nRCPT TO:<support@example.com>\r\n"
                         b"DATA\r\n")
            first, *rest = _replies(f, 4)
            assert first.startswith(b"250") and b"queued as" in first
            assert [r[:3] for r in rest] == [b"250", b"250", b"354"]
            sock.sendall(b"Subject: two\r\n\r\nbody\r\n.\r\nQUIT\r\n")
            second, bye = _replies(f, 2)
            assert second.startswith(b"250") and b"queued as" in second
            assert bye.startswith(b"221")
    # stores each message once, with its own bytes (dot-stuffing undone)
    wait_until(lambda: _count(home) == 4, what="stored messages")
    engine = home.engine()
    with engine.connect() as c:
        raws = [bytes(r) for r in c.scalars(text("SELECT raw FROM inbound_raw ORDER BY inbound_id"))]
    engine.dispose()
    assert raws == [b"Subject: one\r\n\r\n. dotted\r\n", b"Subject: two\r\n\r\nbody\r\n"] * 2
