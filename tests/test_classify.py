"""Specs for mailgw.mail.classify: one class per message, with the evidence for it."""

from __future__ import annotations

import pytest

from mailgw.mail.classify import Ours, classify
from mailgw.mail.parse import parse_message
from mailgw.outbound.verp import Signer

PERSON = "alice@customer.test"


def mail(*headers: str, subject: str = "help", body: str = "My printer is on fire.",
         sender: str = "Alice <alice@customer.test>") -> tuple:
    lines = [f"From: {sender}", "To: support@example.com", f"Subject: {subject}", *headers]
    raw = ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()
    return parse_message(raw), raw


def kind_of(*headers: str, mail_from: str = PERSON, **kw) -> str:
    parsed, raw = mail(*headers, **kw)
    return classify(parsed, mail_from, raw=raw).kind


def test_a_person_is_human_with_no_evidence():
    parsed, raw = mail()
    cls = classify(parsed, PERSON, raw=raw)
    assert cls.kind == "human" and cls.reason is None and not cls.automatic


@pytest.mark.parametrize(("headers", "kw", "expected"), [
    (["Auto-Submitted: auto-replied"], {}, "auto_reply"),
    (["X-Autoreply: yes"], {}, "auto_reply"),
    (["X-Autorespond: yes"], {}, "auto_reply"),
    (["X-Auto-Response-Suppress: All"], {}, "auto_reply"),
    (["Precedence: bulk"], {}, "auto_reply"),
    ([], {"subject": "Auto-Reply: your mail"}, "auto_reply"),
    ([], {"sender": "Shop <no-reply@shop.example>"}, "auto_reply"),
    (["List-Id: Users <users.lists.example.org>"], {}, "list"),
    (["Precedence: list"], {}, "list"),
    (["List-Id: <x.example.org>", "Precedence: bulk"], {}, "list"),
    (["Auto-Submitted: auto-replied"], {"subject": "Out of Office: help"}, "out_of_office"),
    ([], {"subject": "Out of office until Monday"}, "out_of_office"),
    ([], {"subject": "Abwesenheitsnotiz: help"}, "out_of_office"),
    ([], {"subject": "Réponse automatique : absent"}, "out_of_office"),
    ([], {"subject": "Fuera de la oficina"}, "out_of_office"),
    (["Auto-Submitted: auto-replied"], {"subject": "Automatische Antwort: help",
                                        "body": "Ich bin bis 3.5. nicht im Büro."}, "out_of_office"),
    (["Auto-Submitted: auto-replied"], {"subject": "Automatic reply: help",
                                        "body": "I am out of the office until Monday."},
     "out_of_office"),
])
def test_automatic_classes(headers, kw, expected):
    assert kind_of(*headers, **kw) == expected


@pytest.mark.parametrize("subject", [
    "Re: Out of office", "RE: Undeliverable: our invoice", "AW: Abwesenheit", "Fwd: failure notice",
])
def test_replies_and_forwards_about_machine_mail_are_human(subject):
    # A person answering or forwarding an out-of-office or a bounce writes to us: a ticket
    assert kind_of(subject=subject) == "human"


def test_a_person_can_say_auto_submitted_no():
    assert kind_of("Auto-Submitted: no") == "human"


def test_null_sender_alone_is_machine_mail_but_not_a_bounce():
    # RFC 3834 asks auto-responders to send with a null return path too
    parsed, raw = mail()
    cls = classify(parsed, "", raw=raw)
    assert cls.kind == "auto_reply" and cls.reason == "empty return path (null sender)"


def _dsn(action: str, status: str, auto_submitted: bool = True) -> bytes:
    return (
        "From: MAILER-DAEMON@mx.example.net\r\nTo: support@example.com\r\n"
        "Subject: Delivery Status Notification\r\n"
        + ("Auto-Submitted: auto-replied\r\n" if auto_submitted else "")
        + 'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nsorry\r\n"
        "--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\n"
        f"Final-Recipient: rfc822; bob@customer.test\r\nAction: {action}\r\nStatus: {status}\r\n"
        "--b\r\nContent-Type: message/rfc822\r\n\r\n"
        "Message-ID: <orig@helpdesk.test>\r\nSubject: hi\r\n\r\nhi\r\n--b--\r\n"
    ).encode()


def test_bounce_wins_over_auto_submitted_and_carries_the_report():
    raw = _dsn("failed", "5.1.1")
    cls = classify(parse_message(raw), "", raw=raw)
    assert cls.kind == "bounce"
    assert cls.evidence[0] == "multipart/report (delivery-status)"
    assert not any(e.startswith("Auto-Submitted") for e in cls.evidence)
    assert cls.bounce.addresses == ["bob@customer.test"]
    assert cls.bounce.recipients[0].status == "5.1.1" and cls.bounce.permanent
    assert cls.bounce.original_message_ids[0] == "orig@helpdesk.test"


def test_transient_report_is_a_delay():
    raw = _dsn("delayed", "4.4.7")
    cls = classify(parse_message(raw), "", raw=raw)
    assert cls.kind == "delay" and not cls.bounce.permanent


def test_feedback_report_is_its_own_class():
    raw = (b"From: feedback@arf.example.net\r\nSubject: complaint\r\n"
           b'Content-Type: multipart/report; report-type=feedback-report; boundary="b"\r\n\r\n'
           b"--b\r\nContent-Type: text/plain\r\n\r\nabuse\r\n"
           b"--b\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
           b"--b--\r\n")
    assert classify(parse_message(raw), PERSON, raw=raw).kind == "feedback_report"


def test_non_standard_bounce_found_by_its_text():
    # qmail: no report part, only the text names the failed address
    raw = (b"From: MAILER-DAEMON@mail.example.net\r\nSubject: failure notice\r\n\r\n"
           b"Hi. This is the qmail-send program at mail.example.net.\r\n"
           b"I'm afraid I wasn't able to deliver your message to the following addresses.\r\n"
           b"This is a permanent error; I've given up. Sorry it didn't work out.\r\n\r\n"
           b"<carol@customer.test>:\r\n"
           b"192.0.2.1 does not like recipient.\r\n"
           b"Remote host said: 550 5.1.1 <carol@customer.test>: Recipient address rejected\r\n"
           b"Giving up on 192.0.2.1.\r\n\r\n--- Below this line is a copy of the message.\r\n")
    cls = classify(parse_message(raw), "", raw=raw)
    assert cls.kind == "bounce"
    assert cls.bounce.addresses == ["carol@customer.test"]
    assert cls.bounce.detector == "flufl.bounce"
    assert cls.bounce.recipients[0].status == "5.1.1"


def test_our_own_mail_coming_back_is_an_own_loop():
    signer = Signer(b"k" * 32, "helpdesk.test")
    ours = Ours(addresses=frozenset({"support@example.com"}), loop_header="X-Loop",
                is_our_message_id=signer.is_our_message_id, verp_article=signer.verp_article)
    mid = signer.message_id(7)
    parsed, raw = mail(f"Message-ID: <{mid}>", "Auto-Submitted: auto-replied")
    cls = classify(parsed, PERSON, raw=raw, ours=ours)
    assert cls.kind == "own_loop" and "signed" in cls.reason
    # by our loop header naming our address
    parsed, raw = mail("X-Loop: support@example.com")
    assert classify(parsed, PERSON, raw=raw, ours=ours).kind == "own_loop"
    # by our VERP envelope sender
    parsed, raw = mail()
    verp = signer.verp_address(12, "support@example.com")
    assert classify(parsed, verp, raw=raw, ours=ours).kind == "own_loop"
    # another help desk's X-Loop is an auto-reply, not ours
    parsed, raw = mail("X-Loop: helpdesk@other.test")
    assert classify(parsed, PERSON, raw=raw, ours=ours).kind == "auto_reply"
    # a Message-ID that only looks like ours is not
    forged = mid.rsplit(".", 1)[0] + ".aaaaaaaaaa@helpdesk.test"
    parsed, raw = mail(f"Message-ID: <{forged}>")
    assert classify(parsed, PERSON, raw=raw, ours=ours).kind == "human"


def test_verp_tokens_name_the_article_and_cannot_be_forged():
    signer = Signer(b"s" * 32, "helpdesk.test")
    address = signer.verp_address(4242, "support@example.com")
    assert address.startswith("bounces+") and address.endswith("@example.com")
    assert signer.verp_article(address) == 4242
    assert signer.verp_article(address.upper()) == 4242  # MTAs may change the case
    assert signer.verp_article(address.replace("bounces+1092", "bounces+1093")) is None
    assert Signer(b"t" * 32, "helpdesk.test").verp_article(address) is None
    assert signer.verp_article("support@example.com") is None
    assert signer.verp_article("bounces+zz-abc@example.com") is None


def test_evidence_is_short_single_lines():
    parsed, raw = mail("X-Loop: " + "a" * 300, "Auto-Submitted: auto-replied")
    cls = classify(parsed, PERSON, raw=raw)
    assert all("\n" not in e and len(e) < 100 for e in cls.evidence)
    assert len(cls.evidence) == 2
