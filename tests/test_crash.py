"""SIGKILL while a client sends: every message the client saw 250 for is stored exactly once."""

from __future__ import annotations

import smtplib
import threading
from email.message import EmailMessage

import pytest
from sqlalchemy import func, select

from tests.conftest import wait_until

TOTAL = 500


def _message(i: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"user{i % 37}@customer.test"
    msg["To"] = "support@example.com"
    msg["Subject"] = f"crash test {i}"
    msg["Message-ID"] = f"<crash-{i}@customer.test>"
    msg.set_content(f"message number {i}\n")
    return msg


def _restart_and_drain(home, gateway) -> tuple[list[int], int, int]:  # type: ignore[no-untyped-def]
    """Start the gateway again, let it process the backlog, stop it; report what is stored."""
    from mailgw.store import models as m

    gateway.start()
    engine = home.engine()

    def drained() -> bool:
        with engine.connect() as c:
            return c.scalar(select(func.count()).select_from(m.Inbound)
                            .where(m.Inbound.state == "pending")) == 0

    wait_until(drained, timeout=120, what="the backlog to drain")
    assert gateway.stop() == 0
    with engine.connect() as c:
        stored = c.execute(select(m.Article.message_id)
                           .where(m.Article.direction == "in")).scalars().all()
        inbound = c.scalar(select(func.count()).select_from(m.Inbound))
        quarantined = c.scalar(select(func.count()).select_from(m.Inbound)
                               .where(m.Inbound.state == "quarantined"))
    engine.dispose()
    return [int(x.split("-")[1].split("@")[0]) for x in stored], inbound, quarantined


@pytest.mark.timeout(300)
def test_sigkill_during_500_messages_loses_and_duplicates_nothing(home, gateway):

    gateway.start()
    acked: list[int] = []
    errors: list[str] = []
    stop_after = 150  # kill once this many were acknowledged, while the client keeps sending

    def client(start: int, step: int) -> None:
        i = start
        while i < TOTAL:
            try:
                with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as s:
                    while i < TOTAL:
                        s.send_message(_message(i))
                        acked.append(i)  # send_message returned: the server said 250
                        i += step
            except (OSError, smtplib.SMTPException) as exc:
                errors.append(f"{i}: {exc!r}")
                return

    threads = [threading.Thread(target=client, args=(k, 4)) for k in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: len(acked) >= stop_after, timeout=120, what=f"{stop_after} acks")
    gateway.kill()  # SIGKILL: no clean shutdown, the worker may be mid-transaction
    for t in threads:
        t.join(30)
    assert errors, "the clients should have seen the connection die"
    acked_set = set(acked)
    assert len(acked_set) < TOTAL

    # After a restart the worker finishes whatever was durable but not processed
    ids, inbound, quarantined = _restart_and_drain(home, gateway)
    # Every acknowledged message is there...
    assert acked_set <= set(ids), sorted(acked_set - set(ids))[:10]
    # ...exactly once, and nothing is stored twice
    assert len(ids) == len(set(ids))
    assert inbound == len(ids)
    assert quarantined == 0


@pytest.mark.timeout(300)
def test_sigterm_under_load_exits_0_and_keeps_every_acknowledged_message(home, gateway):
    gateway.start()
    acked: list[int] = []

    def client(start: int) -> None:
        i = start
        try:
            with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as s:
                while i < TOTAL:
                    s.send_message(_message(i))
                    acked.append(i)
                    i += 2
        except (OSError, smtplib.SMTPException):
            return  # the server went away mid-session: only acknowledged mail counts

    threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    wait_until(lambda: len(acked) >= 100, timeout=120, what="100 acks")
    # Then a clean shutdown while mail is still arriving
    assert gateway.stop() == 0, gateway.output()
    for t in threads:
        t.join(30)
    ids, _, _ = _restart_and_drain(home, gateway)
    assert set(acked) <= set(ids)
    assert len(ids) == len(set(ids))


def test_sigterm_while_a_client_is_in_data_answers_it_before_exiting(home, gateway):
    """A session that has sent DATA and part of its message when SIGTERM comes is let finish:
    its message is committed and answered 250 before the gateway exits (within 30 s)."""
    import signal
    import time

    gateway.start()
    s = smtplib.SMTP("127.0.0.1", gateway.port, timeout=30)
    s.ehlo()
    s.mail("user1@customer.test")
    s.rcpt("support@example.com")
    code, _ = s.docmd("DATA")
    assert code == 354
    body = _message(7).as_bytes().replace(b"\n", b"\r\n")
    s.send(body[:40])  # part of the message, then the signal
    time.sleep(0.3)  # the session is counted as receiving
    gateway.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    s.send(body[40:] + b"\r\n.\r\n")
    code, resp = s.getreply()
    assert code == 250, resp
    s.close()
    assert gateway.proc.wait(30) == 0, gateway.output()
    ids, inbound, _ = _restart_and_drain(home, gateway)
    assert ids == [7] and inbound == 1
