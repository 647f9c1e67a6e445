"""No automatic mail to an address our mail bounced from permanently, or that reported our
mail as abuse (ARF), for ``loop_protection.bounce_hold_days`` / ``complaint_hold_days``.
Through the real worker on SQLite and PostgreSQL; what would be sent is read from the outbox."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from mailgw.loops import prune
from mailgw.store import models as m
from tests.helpers import Harness, mail
from tests.test_machine_e2e import dsn


def acks_to(h: Harness, address: str) -> list[m.Outbox]:
    return [o for o in h.outbox() if o.rcpt_tos == [address]]


def holds(h: Harness) -> dict[str, m.AddressHold]:
    with Session(h.engine) as s:
        return {x.address: x for x in s.scalars(select(m.AddressHold))}


def first_ack(h: Harness, sender: str = "alice@customer.test") -> m.Outbox:
    h.put(mail("Printer on fire", sender=sender, msgid=f"1.{sender}"))
    h.drain()
    [ack] = acks_to(h, sender)
    assert ack.mail_from.startswith("bounces+")  # VERP: a bounce names this article
    return ack


def bounce(h: Harness, ack: m.Outbox, failed: str, **kw) -> None:  # type: ignore[no-untyped-def]
    h.put(dsn(ack.mail_from, failed, ack.message_id, **kw), rcpt=ack.mail_from, mail_from="")
    h.drain()


def test_a_permanent_bounce_holds_automatic_mail_to_that_address(home):
    h = Harness(home)
    ack = first_ack(h)
    bounce(h, ack, "alice@customer.test")
    hold = holds(h)["alice@customer.test"]
    until = hold.until if hold.until.tzinfo else hold.until.replace(tzinfo=UTC)
    assert hold.kind == "bounce" and hold.article_id == ack.article_id
    assert "5.1.1" in hold.reason
    assert timedelta(days=6.9) < until - datetime.now(UTC) <= timedelta(days=7)
    [ev] = h.events("address_held")
    assert ev.data["addresses"] == ["alice@customer.test"] and ev.data["kind"] == "bounce"

    # alice writes again: the ticket is made, no acknowledgement is queued, and why is stored
    h.put(mail("Another problem", sender="alice@customer.test", msgid="2.alice"))
    h.drain()
    assert len(h.tickets()) == 2 and len(acks_to(h, "alice@customer.test")) == 1
    reasons = [e.data["reason"] for e in h.events("auto_response_suppressed")]
    assert any(r.startswith("automatic mail to alice@customer.test is held until ")
               and "our mail bounced" in r for r in reasons), reasons
    # somebody else is still answered
    first_ack(h, "bob@customer.test")
    h.close()


def test_a_delay_or_a_bounce_naming_someone_else_holds_nothing(home):
    h = Harness(home)
    ack = first_ack(h)
    bounce(h, ack, "alice@customer.test", status="4.4.1", action="delayed")
    bounce(h, ack, "carol@elsewhere.test")  # we never sent this mail to carol
    assert holds(h) == {}
    h.close()


def test_holds_expire_are_pruned_and_can_be_turned_off(home):
    h = Harness(home)
    ack = first_ack(h)
    bounce(h, ack, "alice@customer.test")
    with Session(h.engine) as s, s.begin():
        s.execute(update(m.AddressHold).values(until=datetime.now(UTC) - timedelta(minutes=1)))
    h.put(mail("Back again", sender="alice@customer.test", msgid="3.alice"))
    h.drain()
    assert len(acks_to(h, "alice@customer.test")) == 2  # expired: answered again
    prune(h.engine, h.settings.loop_protection)
    assert holds(h) == {}
    h.close()

    home.update_config(loop_protection={"bounce_hold_days": 0})
    h = Harness(home)
    ack = first_ack(h, "dora@customer.test")
    bounce(h, ack, "dora@customer.test")
    assert "dora@customer.test" not in holds(h)
    h.close()


def arf(to: str, original_id: str) -> bytes:
    """An RFC 5965 abuse report about one of our mails."""
    return (
        "From: abuse@isp.test\r\n"
        f"To: {to}\r\n"
        "Subject: Abuse report\r\n"
        "Message-ID: <arf.1@isp.test>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="A"\r\n\r\n'
        "--A\r\nContent-Type: text/plain\r\n\r\nThis is an abuse report.\r\n\r\n"
        "--A\r\nContent-Type: message/feedback-report\r\n\r\n"
        "Feedback-Type: abuse\r\nUser-Agent: isp-fbl/1.0\r\nVersion: 1\r\n\r\n"
        "--A\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: support@example.com\r\nTo: alice@customer.test\r\nMessage-ID: <{original_id}>\r\n"
        "Subject: [Ticket#1] Your request\r\n\r\n"
        "--A--\r\n"
    ).encode()


def test_an_abuse_complaint_holds_automatic_mail_for_a_year(home):
    h = Harness(home)
    ack = first_ack(h)
    h.put(arf(ack.mail_from, ack.message_id), rcpt=ack.mail_from, mail_from="")
    h.drain()
    hold = holds(h)["alice@customer.test"]
    until = hold.until if hold.until.tzinfo else hold.until.replace(tzinfo=UTC)
    assert hold.kind == "complaint"
    assert until - datetime.now(UTC) > timedelta(days=364)
    h.put(mail("More", sender="alice@customer.test", msgid="4.alice"))
    h.drain()
    assert len(acks_to(h, "alice@customer.test")) == 1
    h.close()


def test_a_hold_made_earlier_in_the_same_batch_counts(home):
    """The bounce and the customer's next mail in one worker batch: the batch's cached holds
    learn of the new one."""
    h = Harness(home)
    ack = first_ack(h)
    h.put(dsn(ack.mail_from, "alice@customer.test", ack.message_id), rcpt=ack.mail_from,
          mail_from="")
    h.put(mail("Another problem", sender="alice@customer.test", msgid="2.alice"))
    h.drain()
    assert "alice@customer.test" in holds(h) and len(h.tickets()) == 2
    assert len(acks_to(h, "alice@customer.test")) == 1
    h.close()
