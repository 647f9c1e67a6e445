"""Bounces in the worker: attached by the original Message-ID, delays recorded, strangers'
bounces and our own returning mail never open a ticket; reply text stored apart."""

from __future__ import annotations

from mailgw.mail.bounce import read_bounce
from tests.helpers import Harness, mail
from tests.test_machine_e2e import dsn


def _ack_of_first_ticket(h: Harness):  # type: ignore[no-untyped-def]
    h.put(mail("Printer on fire", "Room 4.", msgid="m1@customer.test"))
    h.drain()
    [out] = [a for a in h.articles() if a.direction == "out"]
    return out


def test_bounce_quoting_our_message_id_attaches_without_verp(home):
    h = Harness(home)
    try:
        out = _ack_of_first_ticket(h)
        # When a bounce reaches the queue address (an MTA that ignored our return path) and
        # quotes the acknowledgement's Message-ID
        h.put(dsn("support@example.com", "alice@customer.test", out.message_id), mail_from="")
        h.drain()
        # Then it lands on the ticket, marks the acknowledgement failed, and opens nothing
        assert len(h.tickets()) == 1
        arts = h.articles()
        assert [a.mail_class for a in arts if a.direction == "in"] == ["human", "bounce"]
        failed = next(a for a in arts if a.id == out.id)
        assert failed.delivery_state == "failed" and "5.1.1" in failed.delivery_error
        assert "original Message-ID" in arts[-1].thread_reason
        assert len(h.outbox()) == 1  # no answer to the bounce
        # When a delay report arrives for the same mail
        h.put(dsn("support@example.com", "alice@customer.test", out.message_id,
                  status="4.4.7", action="delayed"), mail_from="")
        h.drain()
        # Then it is recorded on the ticket and the acknowledgement is not failed by it
        [delayed] = h.events("delivery_delayed")
        assert delayed.article_id == out.id and delayed.data["class"] == "delay"
        assert len(h.tickets()) == 1
    finally:
        h.close()


def test_strangers_bounces_and_our_own_mail_open_no_ticket(home):
    h = Harness(home)
    try:
        out = _ack_of_first_ticket(h)
        h.put(dsn("support@example.com", "eve@else.test", "spam-we-never-sent@else.test"),
              mail_from="")
        # our own acknowledgement delivered back to our queue (a forwarding loop)
        own = h.outbox()[0].raw
        h.put(own, mail_from=h.outbox()[0].mail_from)
        h.drain()
        assert len(h.tickets()) == 1
        [untrusted] = h.events("bounce_untrusted")
        assert untrusted.ticket_id is None and untrusted.data["failed"][0]["address"] == "eve@else.test"
        [returned] = h.events("own_mail_returned")
        assert "signed" in returned.data["evidence"][0]
        assert len(h.outbox()) == 1 and out.delivery_state != "failed"
    finally:
        h.close()


def test_reply_text_is_stored_apart_from_quotes_and_signature(home):
    h = Harness(home)
    try:
        body = ("Thanks, it works now.\n\n-- \nAlice\n\nOn Mon, Jan 6, 2025 Support "
                "<support@example.com> wrote:\n> Please restart it.\n")
        h.put(mail("Re: printer", body))
        h.drain()
        [article] = [a for a in h.articles() if a.direction == "in"]
        assert article.visible_text == "Thanks, it works now."
        assert article.signature_text == "-- \nAlice"
        assert article.quoted_text.startswith("On Mon, Jan 6") and "restart" in article.quoted_text
        assert "Please restart it." in article.body_text  # the full original is kept
    finally:
        h.close()


def test_read_bounce_never_raises():
    for raw in (b"", b"Content-Type: multipart/report; boundary=x\r\n\r\n--x\r\n",
                b"Content-Type: message/delivery-status\r\n\r\nAction: failed\r\n",
                b"From: MAILER-DAEMON@x\r\n\r\n" + b"<a@b> " * 5000):
        report = read_bounce(raw)
        assert report.recipients == () or all("@" in r.address for r in report.recipients)
