"""End to end on loopback: smtplib → ``mailgw run`` → ticket → acknowledgement at a real sink."""

from __future__ import annotations

import json
import smtplib
from email.message import EmailMessage
from email.utils import make_msgid

from tests.conftest import wait_until


def customer_mail(subject: str, body: str, sender: str = "alice@customer.test",
                  to: str = "support@example.com", **headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Alice Example <{sender}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="customer.test")
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    return msg


def send(port: int, msg: EmailMessage, sender: str | None = None) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.send_message(msg, from_addr=sender or msg["From"].addresses[0].addr_spec)


def tickets(home) -> list[dict]:  # type: ignore[no-untyped-def]
    return json.loads(home.cli("tickets", "list", "--json", check=True).stdout)


def show(home, number: str) -> dict:  # type: ignore[no-untyped-def]
    return json.loads(home.cli("tickets", "show", number, "--json", check=True).stdout)


def test_mail_becomes_ticket_ack_threads_and_reply_lands_on_same_ticket(home, gateway, sink):
    # Given a gateway whose relay is a real SMTP sink
    home.update_config(relay={"host": "127.0.0.1", "port": sink.port})
    gateway.start()

    # When a customer writes to the support address
    first = customer_mail("Printer on fire", "The printer in room 4 is on fire.\nHelp!")
    send(gateway.port, first)

    # Then a ticket exists in the support queue with the customer's article
    [ticket] = wait_until(lambda: tickets(home), what="a ticket")
    assert ticket["queue"] == "support" and ticket["state"] == "new"
    assert ticket["customer"] == "alice@customer.test"
    assert ticket["title"] == "Printer on fire"
    assert len(ticket["number"]) >= 14 and ticket["number"].isdigit()

    # And `tickets show` takes the number as typed, tag included
    assert show(home, f"[Ticket#{ticket['number']}]")["number"] == ticket["number"]

    # And the acknowledgement reaches the sink, threaded to the customer's message
    [ack] = sink.wait_for(1)
    assert ack["To"] == "alice@customer.test"
    assert ack["From"].endswith("<support@example.com>")
    assert f"[Ticket#{ticket['number']}]" in ack["Subject"]
    assert ack["In-Reply-To"] == first["Message-ID"]
    assert first["Message-ID"] in ack["References"]
    assert ack["Auto-Submitted"] == "auto-replied"
    assert ack["Message-ID"].endswith("@helpdesk.test>")
    assert ack["Message-ID"] != first["Message-ID"]
    assert sink.messages[0][1] == ["alice@customer.test"]

    # When the customer replies to the acknowledgement
    reply = customer_mail("Re: " + ack["Subject"], "It is out now, thanks.",
                          In_Reply_To=ack["Message-ID"], References=ack["References"] + " "
                          + ack["Message-ID"])
    send(gateway.port, reply)

    # Then the reply is a second customer article on the same ticket, threaded by In-Reply-To
    def customer_articles():  # type: ignore[no-untyped-def]
        arts = [a for a in show(home, ticket["number"])["articles"] if a["direction"] == "in"]
        return arts if len(arts) == 2 else None

    arts = wait_until(customer_articles, what="the reply on the ticket")
    assert arts[1]["threaded_by"] == "in_reply_to"
    assert "It is out now" in arts[1]["text"]
    assert len(tickets(home)) == 1

    # And the follow-up acknowledgement is threaded too
    acks = sink.wait_for(2)
    assert acks[1]["In-Reply-To"] == reply["Message-ID"]
    assert f"[Ticket#{ticket['number']}]" in acks[1]["Subject"]

    # When a stranger quotes the ticket number without any reference
    stranger = customer_mail(f"About [Ticket#{ticket['number']}]", "I saw smoke too.",
                             sender="mallory@elsewhere.test")
    send(gateway.port, stranger)

    # Then it opens a new ticket, and the reason says why it was not threaded
    def two_tickets():  # type: ignore[no-untyped-def]
        found = tickets(home)
        return found if len(found) == 2 else None

    both = wait_until(two_tickets, what="a second ticket")
    new = next(t for t in both if t["number"] != ticket["number"])
    assert new["customer"] == "mallory@elsewhere.test"
    art = show(home, new["number"])["articles"][0]
    assert art["threaded_by"] == "new_ticket"
    assert "not on that ticket" in art["thread_reason"]
    assert gateway.stop() == 0


def test_subject_number_threads_when_sender_is_on_ticket(home, gateway, sink):
    home.update_config(relay={"host": "127.0.0.1", "port": sink.port})
    gateway.start()
    send(gateway.port, customer_mail("VPN down", "Cannot connect."))
    [ticket] = wait_until(lambda: tickets(home), what="a ticket")
    # A new mail (no In-Reply-To) from the same customer, quoting the number in the subject
    send(gateway.port, customer_mail(f"[Ticket#{ticket['number']}] still down", "Any news?"))
    def incoming():  # type: ignore[no-untyped-def]
        arts = [a for a in show(home, ticket["number"])["articles"] if a["direction"] == "in"]
        return arts if len(arts) == 2 else None

    follow = wait_until(incoming, what="follow-up by subject")[1]
    assert follow["threaded_by"] == "subject_number"
    assert len(tickets(home)) == 1


def test_auto_reply_gets_no_acknowledgement(home, gateway, sink):
    # Given a gateway with a relay
    home.update_config(relay={"host": "127.0.0.1", "port": sink.port})
    gateway.start()
    # When an out-of-office answer arrives, and then a human mail
    send(gateway.port, customer_mail("Out of office", "I am away.",
                                     sender="bob@customer.test", Auto_Submitted="auto-replied"))
    send(gateway.port, customer_mail("Real question", "How do I reset my password?"))
    # Then both are stored, but only the human gets an acknowledgement
    wait_until(lambda: len(tickets(home)) == 2, what="two tickets")
    [ack] = sink.wait_for(1)
    assert ack["To"] == "alice@customer.test"
    auto = next(t for t in tickets(home) if t["customer"] == "bob@customer.test")
    art = show(home, auto["number"])["articles"]
    assert [a["direction"] for a in art] == ["in"]
    assert "Auto-Submitted" in art[0]["automatic"]
    # And a moment later still only one message was sent
    import time

    time.sleep(1.0)
    assert len(sink.messages) == 1


def test_without_relay_outgoing_mail_is_written_to_store_outbox(home, gateway):
    gateway.start()
    send(gateway.port, customer_mail("Hello", "First contact."))
    files = wait_until(lambda: sorted((home.path / "store" / "outbox").glob("*.eml")),
                       what="an .eml in store/outbox")
    raw = files[0].read_bytes()
    assert b"Auto-Submitted: auto-replied" in raw
    assert b"[Ticket#" in raw
