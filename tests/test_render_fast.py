"""build_message's fast flattening against the email package's generator: the same bytes.

``render._flatten`` writes the headers that need no folding or encoding directly and hands
the rest to ``compat32.fold_binary``; these tests build each message once and compare
``_flatten`` with ``Message.as_bytes`` on it, byte for byte, and parse both.
"""

from __future__ import annotations

import random
from email import message_from_bytes
from email.errors import HeaderParseError
from email.header import Header
from email.message import Message

import pytest

from mailgw.outbound import render
from mailgw.outbound.render import _WIRE, build_message

LONG = ("Re: your order of the blue widgets, the ones with the long handles, has not arrived "
        "and we would like to know when it will")


def _reference(monkeypatch: pytest.MonkeyPatch, **kw) -> tuple[bytes, bytes]:  # type: ignore[no-untyped-def]
    """build_message's output and the email package's for the same input and Date."""
    monkeypatch.setattr(render, "format_datetime", lambda _dt: "Fri, 27 Nov 2026 01:00:00 +0000")
    fast = build_message(**kw)
    monkeypatch.setattr(render, "_flatten", lambda msg: msg.as_bytes(policy=_WIRE))
    slow = build_message(**kw)
    return fast, slow


def _args(subject: str, body: str, *, name: str | None = "Support", to: int = 1,
          extra: dict[str, str] | None = None) -> dict:  # type: ignore[type-arg]
    return dict(from_addr="support@example.com", from_name=name,
                to=[f"agent{i}@example.com" for i in range(to)], subject=subject, body=body,
                message_id="mailgw.1.2.abc@desk.test", in_reply_to="root@customer.test",
                references=["root@customer.test", "second@customer.test"],
                extra_headers=extra if extra is not None else {
                    "Auto-Submitted": "auto-generated", "X-Mailgw-Ticket": "2026112710000001",
                    "X-Empty": ""})


@pytest.mark.parametrize("case", [
    _args("[Ticket#2026112710000001] SLA warning: Printer on fire", "Hello,\n\nplease look.\n"),
    _args("Grüße aus Köln — Drucker brennt", "Schöne Grüße\nvon der Hotline\n", name="Süpport"),
    _args(LONG, "line one\r\nline two\rline three\nno newline at the end", to=12),
    _args(LONG + " — ünïcode at the end of a long one", "x" * 200 + "\n",
          extra={"X-Long": "a" * 120, "X-Spaces": "  two  leading and trailing  ",
                 "X-Tab": "a\tb", "X-Exact": "e" * (78 - len("X-Exact: ")),
                 "X-Over": "o" * (79 - len("X-Over: "))}),
], ids=["ascii", "non-ascii", "long", "mixed-edges"])
def test_build_message_same_bytes_as_the_email_package(monkeypatch, case):
    fast, slow = _reference(monkeypatch, **case)
    assert fast == slow
    a, b = message_from_bytes(fast), message_from_bytes(slow)
    assert a.items() == b.items()
    assert a.get_payload(decode=True) == b.get_payload(decode=True)
    assert a["Subject"] is not None and a["Message-ID"] == "<mailgw.1.2.abc@desk.test>"


def test_long_and_non_ascii_headers_are_folded_and_encoded(monkeypatch):
    """The fast path must not write what needs folding or RFC 2047 as it is."""
    fast, _ = _reference(monkeypatch, **_args(LONG + " — ü", "body\n", to=12))
    head = fast.split(b"\r\n\r\n")[0]
    assert b"=?utf-8?" in head  # encoded subject
    assert b"\r\n " in head  # folded continuation lines
    assert "—".encode() not in head
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))


def test_flatten_matches_as_bytes_on_random_headers_and_bodies():
    """Random header values around the 78-character edge, with spaces, tabs, punctuation
    and non-ASCII; random bodies with every kind of line end."""
    rng = random.Random(20261127)
    ascii_only = "abcXYZ09 ,;:=?<>@.\t-_\"'()" + "a" * 20 + "\n\r\x0b"
    alphabet = ascii_only + "é€"
    for i in range(400):
        msg = Message()
        for k in range(rng.randint(1, 8)):
            name = rng.choice(["Subject", "To", "X-Mailgw-SLA", "In-Reply-To", f"X-H{k}"])
            size = rng.choice([0, 1, 5, 60, 70, 74, 75, 76, 77, 78, 90, 200])
            chars = ascii_only if rng.random() < 0.6 else alphabet
            value = "".join(rng.choice(chars) for _ in range(size))
            if value.isascii() or rng.random() < 0.3:
                msg[name] = value
            else:
                msg[name] = Header(value, "utf-8", header_name=name)
        body = "".join(rng.choice(["text", " ", "\n", "\r\n", "\r", "From x", ".", "é"])
                       for _ in range(rng.randint(0, 40)))
        msg["MIME-Version"] = "1.0"
        render._set_text(msg, body)
        try:
            expected = msg.as_bytes(policy=_WIRE)
        except HeaderParseError:  # "\nName:" in a value: refused either way
            with pytest.raises(HeaderParseError):
                render._flatten(msg)
            continue
        assert render._flatten(msg) == expected, f"case {i}: {msg.items()}"


def test_multipart_still_built_by_the_email_package(monkeypatch):
    from mailgw.types import Attachment

    kw = _args("With a file", "see attached\n")
    kw["attachments"] = [Attachment(filename="report.txt", content_type="text/plain",
                                    data=b"hello\n", disposition="attachment", content_id=None)]
    fast, slow = _reference(monkeypatch, **kw)
    a, b = message_from_bytes(fast), message_from_bytes(slow)
    assert a.is_multipart()
    # the boundary is random; everything else is the same
    assert fast.replace(a.get_boundary().encode(), b"B") == slow.replace(
        b.get_boundary().encode(), b"B")
