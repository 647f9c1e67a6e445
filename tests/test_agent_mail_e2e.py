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
    data = home.config()
    data["relay"] = {"host": "127.0.0.1", "port": sink.port}
    data["agents"] = [{"name": "alice", "addresses": [AGENT], "queues": ["support"]}]
    home.write_config(data)
    gateway.start()

    # A customer writes; the ack and the agent's notification reach the sink.
    first = EmailMessage()
    first["From"] = "Carol Customer <carol@customer.test>"
    first["To"] = "support@example.com"
    first["Subject"] = "VPN down"
    first["Message-ID"] = make_msgid(domain="customer.test")
    first.set_content("The VPN has been down since 9:00.\nCarol")
    send(gateway.port, first)
    got = sink.wait_for(2)
    [notification] = [g for g in got if g["To"] == AGENT]
    [ack] = [g for g in got if g["To"] == "carol@customer.test"]
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
