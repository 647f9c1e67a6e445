"""Machine mail end to end on loopback: smtplib → ``mailgw run`` → store, with a real sink.

A bounce of our acknowledgement comes back to its VERP address and lands on the ticket; a
bounce of mail we never sent is recorded and nothing else; two help desks acknowledging
each other stop; the rate limit for automatic mail holds and is recorded.
"""

from __future__ import annotations

import smtplib
import time
from email.utils import make_msgid

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgw.store import models as m
from tests.conftest import Gateway, HomeDir, free_port, wait_until
from tests.test_e2e_smtp import customer_mail, send, show, tickets


def dsn(to: str, failed: str, original_id: str, status: str = "5.1.1",
        action: str = "failed") -> bytes:
    """An RFC 3464 report as Postfix writes it, returning the original's headers."""
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.customer.test>\r\n"
        f"To: {to}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Message-ID: {make_msgid(domain='mx.customer.test')}\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\n"
        f"<{failed}>: host mx.customer.test said: 550 {status} User unknown\r\n\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.customer.test\r\n\r\n"
        f"Final-Recipient: rfc822; {failed}\r\nOriginal-Recipient: rfc822; {failed}\r\n"
        f"Action: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; 550 {status} User unknown\r\n\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: support@example.com\r\nTo: {failed}\r\nMessage-ID: <{original_id}>\r\n"
        "Subject: [Ticket#1] Your request\r\n\r\n"
        "--B--\r\n"
    ).encode()


def send_raw(port: int, raw: bytes, mail_from: str, rcpt: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail(mail_from, [rcpt], raw)


_ENGINES: dict[str, object] = {}


def _engine(home: HomeDir):  # type: ignore[no-untyped-def]
    # Polling reads the store directly: a `mailgw tickets` process per poll would cost a
    # Python start-up each time. The CLI is still used for what the tests assert on.
    if home.store_url not in _ENGINES:
        _ENGINES[home.store_url] = home.engine()
    return _ENGINES[home.store_url]


@pytest.fixture(autouse=True)
def _dispose_engines():  # type: ignore[no-untyped-def]
    yield
    while _ENGINES:
        _ENGINES.popitem()[1].dispose()  # type: ignore[attr-defined]


def events(home: HomeDir, type_: str) -> list[m.Event]:
    with Session(_engine(home)) as s:
        return list(s.scalars(select(m.Event).where(m.Event.type == type_)))


def count(home: HomeDir, model, *where) -> int:  # type: ignore[no-untyped-def]
    with Session(_engine(home)) as s:
        return len(list(s.scalars(select(model.id).where(*where))))


def test_bounce_of_our_ack_lands_on_its_ticket_and_marks_it_failed(home, gateway, sink):
    # Given a gateway whose relay is a real SMTP sink
    home.update_config(relay={"host": "127.0.0.1", "port": sink.port})
    gateway.start()

    # When a customer writes, the acknowledgement goes out from a VERP envelope sender
    send(gateway.port, customer_mail("Printer on fire", "Room 4."))
    [ack] = sink.wait_for(1)
    [ticket] = tickets(home)
    envelope_from = sink.messages[0][0]
    assert envelope_from.startswith("bounces+") and envelope_from.endswith("@example.com")
    assert ack["Auto-Submitted"] == "auto-replied" and ack["Precedence"] == "bulk"
    assert ack["X-Auto-Response-Suppress"] == "All" and ack["X-Loop"] == "support@example.com"

    # And the customer's server bounces it to that address
    send_raw(gateway.port, dsn(envelope_from, "alice@customer.test", ack["Message-ID"][1:-1]),
             "", envelope_from)

    # Then the bounce is an article on the same ticket, and the ack is marked failed
    wait_until(lambda: count(home, m.Article) == 3, what="the bounce on the ticket")
    arts = show(home, ticket["number"])["articles"]
    assert len(arts) == 3
    out = next(a for a in arts if a["direction"] == "out")
    bounce = arts[2]
    assert out["delivery_state"] == "failed"
    assert "alice@customer.test" in out["delivery_error"] and "5.1.1" in out["delivery_error"]
    assert bounce["mail_class"] == "bounce" and bounce["sender_type"] == "system"
    assert "VERP" in bounce["thread_reason"]
    # And no ticket was opened and nothing was sent back
    assert count(home, m.Ticket) == 1
    [failed] = events(home, "delivery_failed")
    assert failed.data["failed"][0]["address"] == "alice@customer.test"
    assert failed.data["failed"][0]["permanent"] is True
    time.sleep(0.5)
    assert len(sink.messages) == 1

    # When a bounce names a message we never sent, to the queue address
    send_raw(gateway.port, dsn("support@example.com", "bob@customer.test",
                               "never-sent@elsewhere.test"), "", "support@example.com")
    # Then it is recorded as untrusted: no ticket, no article, no answer
    [untrusted] = wait_until(lambda: events(home, "bounce_untrusted"), what="untrusted bounce")
    assert untrusted.data["class"] == "bounce" and untrusted.ticket_id is None
    assert untrusted.data["failed"][0]["address"] == "bob@customer.test"
    assert count(home, m.Ticket) == 1
    assert len(sink.messages) == 1

    # And a forged VERP token is refused at RCPT, so no backscatter can ride on it
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send_raw(gateway.port, b"Subject: x\r\n\r\nx\r\n", "",
                 "bounces+1-aaaaaaaaaa@example.com")
    assert gateway.stop() == 0


def test_rate_limit_for_automatic_mail_is_enforced_and_recorded(home, gateway, sink):
    # Given at most two automatic mails per address a day
    home.update_config(relay={"host": "127.0.0.1", "port": sink.port},
                       loop_protection={"max_per_sender": 2})
    gateway.start()
    # When the same customer opens three tickets
    for n in range(3):
        send(gateway.port, customer_mail(f"Question {n}", "Help please."))
    wait_until(lambda: count(home, m.Ticket) == 3, what="three tickets")
    # Then two acknowledgements go out, and the third is held back with the reason recorded
    sink.wait_for(2)
    [hit] = wait_until(lambda: events(home, "rate_limit_hit"), what="a rate-limit event")
    assert hit.data["to"] == "alice@customer.test"
    assert "max_per_sender 2" in hit.data["reason"]
    time.sleep(0.5)
    assert len(sink.messages) == 2
    assert gateway.stop() == 0


def test_two_help_desks_acknowledging_each_other_stop(home, gateway, tmp_path):
    # Given two gateways, each relaying to the other: A serves support@example.com, B serves
    # helpdesk@b.test
    other = HomeDir(tmp_path / "home-b", f"sqlite:///{tmp_path / 'home-b' / 'store' / 'b.db'}")
    from mailgw.home import init_home

    init_home(other.path)
    b = Gateway(other, free_port())
    other.update_config(hostname="b.test", queues=[{"name": "b", "addresses": ["helpdesk@b.test"]}],
                        relay={"host": "127.0.0.1", "port": gateway.port})
    home.update_config(relay={"host": "127.0.0.1", "port": b.port})
    gateway.start()
    b.start()
    try:
        # When B's address writes to A (a person at B, or B's own notice)
        send(gateway.port, customer_mail("Hello from B", "Can you help?", sender="helpdesk@b.test"))
        # Then A acknowledges to B, B stores A's automatic mail without answering it
        wait_until(lambda: count(other, m.Ticket) == 1, what="A's acknowledgement stored at B")
        time.sleep(1.0)  # room for a reply that must not come
        sent = count(home, m.Outbox) + count(other, m.Outbox)
        assert 1 <= sent <= 3
        assert count(other, m.Outbox) == 0
        [stored] = tickets(other)
        art = show(other, stored["number"])["articles"]
        assert [a["direction"] for a in art] == ["in"]
        assert art[0]["mail_class"] == "auto_reply" and "Auto-Submitted" in art[0]["automatic"]
        assert events(other, "auto_response_suppressed")
    finally:
        b.stop()
