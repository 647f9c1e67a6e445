"""End to end on loopback: customer mail → notification to the agent at a real sink → the
agent answers by smtplib to the signed Reply-To → the customer receives the answer at the
sink, from the queue, threaded, quote stripped, attachment kept; notes and out-of-office
answers go nowhere."""

from __future__ import annotations

import re
import smtplib
from email.message import EmailMessage
from email.utils import getaddresses, make_msgid

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgw.store import models as m

AGENT = "alice@agents.test"


def send(port: int, msg: EmailMessage, rcpt: str | None = None) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.send_message(msg, from_addr=msg["From"].addresses[0].addr_spec,
                       to_addrs=[rcpt] if rcpt else None)


def agent_mail(notification, to: str, body: str, **headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Alice Agent <{AGENT}>"
    msg["To"] = to
    msg["Subject"] = "Re: " + notification["Subject"]
    msg["Message-ID"] = make_msgid(domain="agents.test")
    msg["In-Reply-To"] = notification["Message-ID"]
    msg["References"] = notification["Message-ID"]
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    return msg


def test_agent_answers_from_own_client_and_customer_sees_the_queue(home, gateway, sink):
    # A customer writes; the ack and the agent's notification reach the sink.
    notification, ack, first = _start(home, gateway, sink, subject="VPN down",
                                      body="The VPN has been down since 9:00.\nCarol",
                                      sender="Carol Customer <carol@customer.test>")
    tag = re.search(r"\[Ticket#\d+\]", ack["Subject"]).group(0)
    reply_to = notification["Reply-To"]
    assert reply_to.startswith("support+t.")
    assert tag in notification["Subject"]
    notified = notification.get_payload(decode=True).decode()
    comment = re.search(r"support\+c\.[a-z2-7]+@example\.com", notified).group(0)

    # The agent answers from their client: the notification quoted below, a file attached.
    answer = agent_mail(notification, reply_to,
                        "Hi Carol,\n\nthe VPN is back; a report is attached.\n\nAlice\n\n"
                        "On Fri, 27 Nov 2026, Carol Customer via Example Support wrote:\n"
                        + "".join(f"> {line}\n" for line in notified.splitlines()))
    answer.add_attachment(b"uptime report\n" * 20, maintype="text", subtype="plain",
                          filename="report.txt")
    send(gateway.port, answer, rcpt=reply_to)
    got = sink.wait_for(3)
    customer = got[2]
    assert sink.messages[2][1] == ["carol@customer.test"]
    assert sink.messages[2][0].startswith("bounces+")  # VERP envelope
    assert getaddresses([customer["From"]])[0][1] == "support@example.com"
    assert customer["To"] == "carol@customer.test"
    assert customer["Subject"] == f"{tag} Re: VPN down"
    assert customer["In-Reply-To"] == first["Message-ID"]
    assert customer["References"].split()[0] == first["Message-ID"]
    assert customer["Message-ID"].endswith("@helpdesk.test>")
    raw_headers = sink.messages[2][2].split(b"\r\n\r\n", 1)[0].lower()
    assert b"agents.test" not in raw_headers and b"alice" not in raw_headers
    parts = list(customer.walk())
    text = parts[1].get_payload(decode=True).decode()
    assert "the VPN is back" in text and "since 9:00" not in text and "wrote:" not in text
    assert parts[2].get_filename() == "report.txt"
    assert parts[2].get_payload(decode=True) == b"uptime report\n" * 20

    # An internal note and the agent's out-of-office answer go nowhere; a later answer does
    # (it marks that both were processed before it, and that nothing was sent for them).
    send(gateway.port, agent_mail(notification, comment, "Internal: root cause is the ISP."),
         rcpt=comment)
    send(gateway.port, agent_mail(notification, reply_to, "I am out of the office.",
                                  Auto_Submitted="auto-replied"), rcpt=reply_to)
    send(gateway.port, agent_mail(notification, reply_to, "One more thing: reboot once."),
         rcpt=reply_to)
    got = sink.wait_for(4)
    assert "reboot once" in got[3].get_payload(decode=True).decode()
    engine = home.engine()
    try:
        # One worker takes the oldest mail first: the last answer's outbox row committed
        # after (or with) the note and the out-of-office answer.
        with Session(engine) as s:
            agent_articles = list(s.scalars(select(m.Article).where(
                m.Article.sender_type == "agent").order_by(m.Article.id)))
            assert [(a.internal, a.is_automatic) for a in agent_articles] == [
                (False, False), (True, False), (True, True), (False, False)]
    finally:
        engine.dispose()
    assert len(sink.messages) == 4
    assert all(b"root cause" not in raw and b"out of the office" not in raw
               for _, _, raw in sink.messages)
    import json

    shown = json.loads(home.cli("tickets", "show", tag, "--json", check=True).stdout)
    mine = [(a["internal"], a["direction"]) for a in shown["articles"] if a["agent"] == "alice"
            and a["sender_type"] == "agent"]
    assert mine == [(False, "out"), (True, "in"), (True, "in"), (False, "out")]


def _start(home, gateway, sink, *, subject: str = "Printer jam", body: str = "Paper stuck.",  # type: ignore[no-untyped-def]
           sender: str = "carol@customer.test", **agent_mail):
    """A gateway with agent alice, relaying to the sink; carol opens a ticket. Returns the
    agent's notification and carol's acknowledgement as the sink got them, and carol's mail."""
    data = home.config()
    data["relay"] = {"host": "127.0.0.1", "port": sink.port}
    data["agents"] = [{"name": "alice", "addresses": [AGENT], "queues": ["support"]}]
    data["agent_mail"] = {**data["agent_mail"], **agent_mail}
    home.write_config(data)
    gateway.start()
    first = EmailMessage()
    first["From"] = sender
    first["To"] = "support@example.com"
    first["Subject"] = subject
    first["Message-ID"] = make_msgid(domain="customer.test")
    first.set_content(body)
    send(gateway.port, first)
    got = sink.wait_for(2)
    [notification] = [g for g in got if g["To"] == AGENT]
    [ack] = [g for g in got if g["To"] == "carol@customer.test"]
    return notification, ack, first


def test_forged_from_and_expired_token_are_refused_and_the_agent_told(home, gateway, sink):
    import json
    from datetime import UTC, datetime, timedelta

    from mailgw.agent_mail.tokens import make_address

    notification, _, _ = _start(home, gateway, sink, forged="refuse")
    # Someone writes with alice's From to the plain queue address, with a command.
    forged = EmailMessage()
    forged["From"] = AGENT
    forged["To"] = "support@example.com"
    forged["Subject"] = "Re: " + notification["Subject"]
    forged["Message-ID"] = make_msgid(domain="evil.test")
    forged.set_content("#close\nDone.")
    send(gateway.port, forged)
    # And alice answers with a reply address 31 days old.
    settings = home.settings()
    ticket_id = int(notification["Message-ID"].split(".")[1])
    old = make_address(settings, settings.queue("support"), "t", settings.agent("alice"),
                       ticket_id, datetime.now(UTC) - timedelta(days=31))
    send(gateway.port, agent_mail(notification, old, "Answer on an old address"), rcpt=old)

    got = sink.wait_for(4)
    told = [g for g in got[2:] if g["To"] == AGENT]
    assert len(told) == 2 and all("Not sent:" in t["Subject"] for t in told)
    bodies = " ".join(t.get_payload(decode=True).decode() for t in told)
    assert "signed reply address" in bodies and "expired" in bodies
    assert [rcpts for _, rcpts, _ in sink.messages].count(["carol@customer.test"]) == 1  # ack
    quarantined = json.loads(home.cli("quarantine", "list", "--json", check=True).stdout)
    assert len(quarantined) == 2
    [ticket] = json.loads(home.cli("tickets", "list", "--json", check=True).stdout)
    assert ticket["state"] == "new"  # the forged #close did nothing


def test_commands_by_mail_end_to_end(home, gateway, sink):
    import json

    import pytest

    pytest.importorskip("mailgw.agent_commands", reason="agent-cmd branch not merged yet")
    notification, _, _ = _start(home, gateway, sink)
    reply_to = notification["Reply-To"]
    send(gateway.port, agent_mail(notification, reply_to, "#bogus\nHello"), rcpt=reply_to)
    send(gateway.port, agent_mail(notification, reply_to, "#pending 3d\n#priority high\n"
                                  "Waiting for the part."), rcpt=reply_to)
    got = sink.wait_for(4)
    [refusal] = [g for g in got[2:] if g["To"] == AGENT]
    assert "bogus" in refusal.get_payload(decode=True).decode()
    [answer] = [g for g in got[2:] if g["To"] == "carol@customer.test"]
    text = answer.get_payload(decode=True).decode()
    assert "Waiting for the part." in text and "#pending" not in text and "Hello" not in text
    [ticket] = json.loads(home.cli("tickets", "list", "--json", check=True).stdout)
    assert ticket["state"] == "pending" and ticket["priority"] == 2
