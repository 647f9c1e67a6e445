"""Specs for mailgw.mail.machine.automatic_reason: which mail must never get an auto-reply."""

from __future__ import annotations

import pytest

from mailgw.mail.machine import automatic_reason
from mailgw.mail.parse import parse_message
from tests.corpus import iter_corpus_messages

HUMAN_SENDER = "alice@customer.test"


def parsed(*headers: str, body: str = "Hello, my printer is on fire.") -> object:
    """A message from Alice with the given extra header lines."""
    lines = ["From: Alice <alice@customer.test>", "To: support@example.com", "Subject: help"]
    return parse_message(("\r\n".join([*lines, *headers]) + "\r\n\r\n" + body).encode())


def test_mail_from_a_person_is_not_automatic():
    # Given an ordinary customer message with a real envelope sender
    # Then there is no reason to withhold the auto-reply
    assert automatic_reason(parsed(), HUMAN_SENDER) is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (["Auto-Submitted: auto-replied"], "Auto-Submitted: auto-replied"),
        (["Auto-Submitted: auto-generated; owner-email=x@y"], "Auto-Submitted: auto-generated"),
        (["Auto-Submitted:"], "Auto-Submitted: (empty)"),
        (["X-Autoreply: yes"], "X-Autoreply: yes"),
        (["X-Autorespond: Out of office"], "X-Autorespond: Out of office"),
        (["X-Auto-Response-Suppress: All"], "X-Auto-Response-Suppress: All"),
        (["X-Auto-Response-Suppress: DR, OOF, AutoReply"], "X-Auto-Response-Suppress: DR"),
        (["Precedence: bulk"], "Precedence: bulk"),
        (["Precedence: JUNK"], "Precedence: junk"),
        (["Precedence: list"], "Precedence: list"),
        (["X-Loop: helpdesk@example.com"], "X-Loop: helpdesk@example.com"),
        (["List-Id: Users <users.lists.example.org>"], "mailing list (List-Id: Users"),
        (["List-Unsubscribe: <mailto:leave@lists.example.org>"], "mailing list"),
        (["Return-Path: <>"], "empty return path (null sender)"),
    ],
)
def test_each_header_signal_is_named(headers, expected):
    # Given a message carrying one machine-mail header
    reason = automatic_reason(parsed(*headers), HUMAN_SENDER)
    # Then the reason names that header
    assert reason is not None and reason.startswith(expected), reason


@pytest.mark.parametrize(
    "headers",
    [
        ["Auto-Submitted: no"],
        ["Auto-Submitted: No (sent by a person)"],
        ["X-Autoreply: no"],
        ["X-Auto-Response-Suppress: DR, NDR, RN, NRN"],
        ["Precedence: first-class"],
        ["Return-Path: <alice@customer.test>"],
    ],
)
def test_signals_that_say_human_are_not_automatic(headers):
    # Given headers that exist but declare a person (RFC 3834 §5: "no")
    # Then the message is still treated as human
    assert automatic_reason(parsed(*headers), HUMAN_SENDER) is None


def test_null_envelope_sender_is_a_bounce():
    # Given the null reverse-path "<>" as envelope sender (RFC 5321 §4.5.5)
    # Then the message is automatic even though its headers look human
    assert automatic_reason(parsed(), "") == "empty return path (null sender)"


@pytest.mark.parametrize(
    ("from_header", "mail_from", "expected"),
    [
        (
            "Mail Delivery Subsystem <MAILER-DAEMON@mx.example.net>",
            HUMAN_SENDER,
            "sender is mailer-daemon",
        ),
        ("Alice <alice@customer.test>", "mailer-daemon@mx.example.net", "sender is mailer-daemon"),
        ("The Post Office <postmaster@example.net>", HUMAN_SENDER, "sender is postmaster"),
        ("Shop <no-reply@shop.example>", HUMAN_SENDER, "no-reply sender (no-reply@shop.example)"),
        ("Shop <noreply@shop.example>", HUMAN_SENDER, "no-reply sender"),
        ("Shop <do-not-reply@shop.example>", HUMAN_SENDER, "no-reply sender"),
        ("Shop <DoNotReply@shop.example>", HUMAN_SENDER, "no-reply sender"),
        ("Shop <billing-noreply@shop.example>", HUMAN_SENDER, "no-reply sender"),
        ("Shop <no_reply+42@shop.example>", HUMAN_SENDER, "no-reply sender"),
    ],
)
def test_sender_local_parts_that_mean_machine(from_header, mail_from, expected):
    # Given a bounce or no-reply address as From or as envelope sender
    # Then the reason names the address
    raw = f"From: {from_header}\r\nSubject: x\r\n\r\nbody".encode()
    reason = automatic_reason(parse_message(raw), mail_from)
    assert reason is not None and reason.startswith(expected), reason


@pytest.mark.parametrize(
    "local", ["nobody", "reply", "noreen", "knoreply", "postmasters", "daemon"]
)
def test_similar_local_parts_are_people(local):
    # Given senders whose names only resemble machine addresses
    raw = f"From: {local}@example.com\r\nSubject: x\r\n\r\nbody".encode()
    # Then they get the normal treatment
    assert automatic_reason(parse_message(raw), f"{local}@example.com") is None


def test_bounce_signals_win_over_auto_submitted():
    # Given a DSN that also says Auto-Submitted (about 260 real bounces do)
    raw = (
        b"From: Mail Delivery System <MAILER-DAEMON@mx.example.net>\r\n"
        b"Auto-Submitted: auto-replied\r\n"
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nfailed\r\n"
        b"--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\n"
        b"Final-Recipient: rfc822; x@y\r\nAction: failed\r\nStatus: 5.1.1\r\n--b--\r\n"
    )
    # Then the reason is the report, checked first
    assert (
        automatic_reason(parse_message(raw), HUMAN_SENDER) == "multipart/report (delivery-status)"
    )
    # And with a null sender but no report, the null sender comes before Auto-Submitted
    assert automatic_reason(parsed("Auto-Submitted: auto-replied"), "") == (
        "empty return path (null sender)"
    )


def test_reasons_are_short_single_lines():
    # Given a hostile, folded, very long header value
    reason = automatic_reason(parsed("X-Loop: " + "a" * 300 + "\r\n\tmore"), HUMAN_SENDER)
    assert reason is not None and "\n" not in reason and len(reason) < 100


# --- Against labelled real mail -----------------------------------------------------------

BOUNCE_FOLDERS = (
    "flufl-bounce/data/",
    "flanker/tests/fixtures/messages/bounce/",
    "flanker/tests/fixtures/messages/complaints/",
    "ruby-mail-gem/spec/fixtures/emails/multipart_report_emails/",
    "enmime/dsn/testdata/",
    "mimekit/UnitTests/TestData/messages/delivery-status",
)
# Messages in the bounce folders that are not machine mail at all: flufl.bounce keeps them to
# prove its detectors find nothing there. Every real bounce, including the eight whose
# headers carry no machine signal (only their subject or text says "delivery failed"), is
# caught by the classifier reading the subject and the report (mailgw.mail.classify).
NOT_MACHINE_MAIL = {
    "flufl-bounce/data/groupwise_03.txt",  # a GroupWise user's reply quoting the original
    "flufl-bounce/data/simple_20.txt",  # "RE: ... awaits moderator approval" from a person
}
HUMAN_FOLDERS = ("talon/tests/fixtures/", "django-helpdesk/")


def test_labelled_bounces_are_automatic_and_human_replies_are_not():
    # Given the corpus folders labelled as bounces/complaints and as human replies, and an
    # envelope sender that looks human (so only what is in the message counts)
    missed, false_alarms, bounces, humans = [], [], 0, 0
    for name, raw in iter_corpus_messages():
        if name.startswith(BOUNCE_FOLDERS):
            bounces += 1
            if automatic_reason(parse_message(raw), HUMAN_SENDER, raw=raw) is None:
                missed.append(name)
        elif name.startswith(HUMAN_FOLDERS):
            humans += 1
            reason = automatic_reason(parse_message(raw), HUMAN_SENDER, raw=raw)
            if reason is not None:
                false_alarms.append((name, reason))
    # Then every bounce is caught, and no person's reply is flagged
    assert bounces > 140 and humans > 15
    assert sorted(missed) == sorted(NOT_MACHINE_MAIL)
    assert false_alarms == []
