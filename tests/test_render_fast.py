"""build_message's fast flattening against the email package's generator: the same bytes.

``render._flatten`` writes the headers that need no folding or encoding directly, folds
long printable-ASCII ones itself (``_fold_ascii``) and hands the rest to
``compat32.fold_binary``; a single-part ASCII mail is written without a Message object at
all. These tests compare each with ``Message.as_bytes`` (or ``fold_binary``), byte for byte.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.charset import Charset
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
    monkeypatch.setattr(render, "_date_now", lambda: "Fri, 27 Nov 2026 01:00:00 +0000")
    fast = build_message(**kw)
    monkeypatch.setattr(render, "_DIRECT", False)
    monkeypatch.setattr(render, "_flatten", lambda msg: msg.as_bytes(policy=_WIRE))
    monkeypatch.setattr(render, "_UTF8_HEADER", Charset("utf-8"))
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
    _args("[Ticket#2026110210000000001] SLA warning: first response 75% used: Request 12345",
          "Ticket x\n" * 20, extra={"X-Mailgw-SLA": "std first_response warning 75%"}),
    _args("Re: one, two; three\tfour " * 6, "body\n", name=None, to=9,
          extra={"X-Long-Word": "w" * 100, "X-Tabs": "a\tb\t\tc " * 12,
                 "X-Commas": ",".join(["item"] * 30), "X-Semi": "; ".join(["k=v"] * 25)}),
    _args(LONG + " — ünïcode at the end of a long one", "x" * 200 + "\n",
          extra={"X-Long": "a" * 120, "X-Spaces": "  two  leading and trailing  ",
                 "X-Tab": "a\tb", "X-Exact": "e" * (78 - len("X-Exact: ")),
                 "X-Over": "o" * (79 - len("X-Over: "))}),
], ids=["ascii", "non-ascii", "long", "sla-notice", "long-ascii-kinds", "mixed-edges"])
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


def _random_value(rng: random.Random) -> str:
    """Printable ASCII with tabs: words of many lengths (some longer than a line), runs of
    spaces and tabs, commas and semicolons inside and at the ends of words, edge whitespace."""
    words = ["a", "bb", "Re:", "[Ticket#2026112710000001]", "SLA", "75%", "Hello,", "x;",
             ",", ";", "a,b", "k=v;", "<id@host.test>", "w" * 40, "v" * 77, "u" * 120]
    gaps = [" "] * 6 + ["  ", "\t", " \t", "\t ", "   "]
    value = rng.choice(["", "", " ", "\t", "  "])
    for i in range(rng.randint(0, 30)):
        if i:
            value += rng.choice(gaps)
        if rng.random() < 0.6:
            value += rng.choice(words)
        else:
            value += "".join(rng.choice("abcXYZ09,;:=!?-_.()<>@\"'") for _ in
                             range(rng.choice([1, 2, 3, 5, 8, 13, 21, 34, 55, 78, 90])))
    return value + rng.choice(["", "", " ", "\t", " ,", ";"])


def test_fold_ascii_matches_compat32_on_random_long_values():
    """_fold_ascii gives fold_binary's bytes for printable ASCII with tabs, whatever the
    word lengths, separators and header name length."""
    rng = random.Random(611)
    names = ["Subject", "To", "X", "X-Mailgw-SLA", "References", "X-" + "N" * 40,
             "X-" + "L" * 76]
    for i in range(6000):
        name, value = rng.choice(names), _random_value(rng)
        assert render._PLAIN_ASCII.fullmatch(value)
        assert render._fold_ascii(name, value) == _WIRE.fold_binary(name, value), (
            f"case {i}: {name!r} {value!r}")


def test_fold_ascii_is_not_used_for_other_values():
    """Line breaks, other controls and non-ASCII go to the email package."""
    for value in ["a\nb", "a\r\nSubject: x", "a\x0bb", "caf\u00e9", "a\x7f"]:
        assert not render._PLAIN_ASCII.fullmatch(value)


def test_build_message_direct_matches_message_path_on_random_subjects(monkeypatch):
    """The Message-less path of build_message against the Message one, random long
    subjects and header values, ASCII bodies with every line end."""
    rng = random.Random(27)
    for i in range(300):
        body = "".join(rng.choice(["text", " ", "\n", "\r\n", "\r", "From x", "."])
                       for _ in range(rng.randint(0, 40)))
        kw = _args(_random_value(rng).strip() or "x", body, to=rng.randint(1, 12),
                   name=rng.choice([None, "Support", "Help, Desk"]),
                   extra={"X-Mailgw-SLA": _random_value(rng), "Precedence": "bulk"})
        fast, slow = _reference(monkeypatch, **kw)
        monkeypatch.undo()
        assert fast == slow, f"case {i}"


def test_fold_words_matches_compat32_on_random_subjects():
    """The single-space word path (most subjects) against fold_binary: word lengths from 1
    to past a whole line, header names short and long."""
    rng = random.Random(1127)
    alphabet = "abcXYZ09[]#%:!?-_.()<>@\"'/"
    for i in range(6000):
        words = ["".join(rng.choice(alphabet) for _ in range(
            rng.choice([1, 2, 3, 5, 8, 13, 20, 40, 70, 76, 77, 78, 79, 100])))
            for _ in range(rng.randint(1, 25))]
        value = " ".join(words)
        name = rng.choice(["Subject", "To", "X", "X-Mailgw-SLA", "X-" + "L" * 70])
        assert render._SIMPLE.fullmatch(value)
        assert render._fold_words(name, value) == _WIRE.fold_binary(name, value), (
            f"case {i}: {name!r} {value!r}")


def test_date_header_is_the_current_second(monkeypatch):
    from email.utils import format_datetime, parsedate_to_datetime

    clock = iter([1795000000.2, 1795000000.9, 1795000001.0])
    monkeypatch.setattr(render.time, "time", lambda: next(clock))
    monkeypatch.setattr(render, "_date_cache", (-1, ""))
    first, same, later = render._date_now(), render._date_now(), render._date_now()
    assert first == same == format_datetime(datetime.fromtimestamp(1795000000, UTC))
    assert parsedate_to_datetime(later) - parsedate_to_datetime(first) == timedelta(seconds=1)


# --- Non-ASCII headers and bodies (issue 8, session 5) ------------------------------------


def _random_text(rng: random.Random, size: int) -> str:
    pieces = ["a", "Re:", " ", "  ", "\t", "ü", "é", "—", "€", "山田", "😀", "=", "?", "_",
              ",", ";", "[Ticket#2026112710000001]", "Grüße", "x" * 30, "\u00a0"]
    return "".join(rng.choice(pieces) for _ in range(size))


def _budgets(first: int, rest: int):  # type: ignore[no-untyped-def]
    yield first
    while True:
        yield rest


def test_utf8_header_lines_are_the_email_packages():
    """The linear header_encode_lines against the stdlib's, with the line budgets
    _ValueFormatter gives it (first line shortened by the header name, some too short for
    even one character)."""
    rng = random.Random(28)
    ours, stdlib = render._Utf8HeaderCharset("utf-8"), Charset("utf-8")
    for _ in range(3000):
        value = _random_text(rng, rng.choice([0, 1, 2, 5, 10, 20, 40, 80]))
        first = rng.choice([-5, 0, 5, 13, 14, 20, 40, 60, 70, 76])
        rest = rng.choice([13, 14, 15, 20, 50, 77])

        assert ours.header_encode_lines(value, _budgets(first, rest)) == (
            stdlib.header_encode_lines(value, _budgets(first, rest))), (value, first, rest)


def test_non_ascii_headers_fold_as_the_email_package():
    rng = random.Random(2811)
    for _ in range(1500):
        name = rng.choice(["Subject", "X-Mailgw-Ticket", "X-" + "h" * rng.randint(1, 70)])
        value = _random_text(rng, rng.choice([1, 3, 8, 20, 40, 90]))
        if value.isascii():
            continue
        expected = _WIRE.fold_binary(name, Header(value, "utf-8", header_name="Subject"))
        assert _WIRE.fold_binary(name, render._header(value)) == expected, value


def test_non_ascii_headers_fold_without_the_formatter_as_fold_binary_does():
    """_fold_text (a one-line non-ASCII value, _TextHeader) against fold_binary of the same
    header and of the stdlib's own Header: random values, some with line breaks (those go
    to fold_binary), header names of every length (the first line's budget)."""
    rng = random.Random(2812)
    breaks = ["\n", "\r", "\x0b", "\x85", "\u2028"]
    for _ in range(3000):
        name = rng.choice(["Subject", "X-Mailgw-Ticket", "X-" + "h" * rng.randint(1, 75)])
        value = _random_text(rng, rng.choice([1, 3, 8, 20, 40, 90, 200]))
        if rng.random() < 0.1:
            at = rng.randrange(len(value) + 1)
            value = value[:at] + rng.choice(breaks) + value[at:]
        if value.isascii():
            continue
        header = render._header(value, name)
        expected = _WIRE.fold_binary(name, Header(value, "utf-8", header_name=name))
        assert _WIRE.fold_binary(name, header) == expected, value
        assert render._flatten_items([(name, header)], "") == expected + b"\r\n", value
        if value.splitlines() == [value]:
            assert render._fold_text(name, header) == expected, value


def test_a_non_ascii_subject_is_not_folded_by_email_header(monkeypatch):
    """Given an acknowledgement with a non-ASCII subject, build_message writes it without
    email.header's _ValueFormatter (about half of its fold's cost)."""
    import email.header

    kw = _args("Re: Grüße aus Köln, wo bleibt die Lieferung der blauen Widgets?", "Hallo ·\n")
    expected = _reference(monkeypatch, **kw)[1]
    monkeypatch.undo()
    monkeypatch.setattr(render, "_date_now", lambda: "Fri, 27 Nov 2026 01:00:00 +0000")

    def refuse(*a, **kw):  # type: ignore[no-untyped-def]
        raise AssertionError("email.header's formatter used")

    monkeypatch.setattr(email.header, "_ValueFormatter", refuse)
    assert build_message(**kw) == expected


def test_non_ascii_bodies_are_written_as_the_email_package_does(monkeypatch):
    """The quoted-printable single part without a Message object: random bodies and
    subjects, against the Message path with the stdlib's own charset."""
    rng = random.Random(1127)
    for i in range(300):
        body = "".join(rng.choice(["text ", "Grüße", "·", "\n", "\r\n", "\r", " \n", "\t",
                                   "=", "x" * 80, "€", ".", "From me"])
                       for _ in range(rng.randint(1, 60)))
        if body.isascii():
            body += "·"
        subject = _random_text(rng, rng.randint(1, 30))
        fast, slow = _reference(monkeypatch, **_args(subject, body, name=rng.choice(
            ["Support", "Süpport", None])))
        monkeypatch.undo()
        assert fast == slow, f"case {i}"


def test_an_extra_mime_header_takes_the_message_path(monkeypatch):
    kw = _args("Grüße", "Grüße\n", extra={"Content-Type": "text/plain; charset=utf-8"})
    fast, slow = _reference(monkeypatch, **kw)
    assert fast == slow
    assert fast.count(b"Content-Type:") == 1


def test_quoted_printable_header_length_is_the_email_packages():
    """The length header_encode_lines compares to choose the encoder, counted with
    bytes.translate, against quoprimime.header_length; and the choice on random values
    (mostly ASCII values take quoted-printable)."""
    from email import quoprimime

    rng = random.Random(2047)
    for _ in range(3000):
        data = bytes(rng.choice([rng.randrange(256), rng.randrange(32, 127), 32])
                     for _ in range(rng.randint(0, 60)))
        assert len(data) + 2 * len(data.translate(None, render._QP_PLAIN)) == (
            quoprimime.header_length(data))
    ours, stdlib = render._Utf8HeaderCharset("utf-8"), Charset("utf-8")
    kinds = set()
    for _ in range(3000):
        value = _random_text(rng, rng.choice([1, 3, 10, 30, 120]))
        encoded = ours.header_encode_lines(value, _budgets(40, 60))
        assert encoded == stdlib.header_encode_lines(value, _budgets(40, 60)), value
        kinds.add(encoded[-1][:10])
    assert {"=?utf-8?b?", "=?utf-8?q?"} <= kinds


def test_acknowledgements_of_the_corpus_are_the_email_packages(monkeypatch):
    """Every message of the golden sample (a generated corpus and a third of the shared
    one): its acknowledgement, rendered from the shipped templates with the headers
    mailgw.process gives build_message, against the email package's bytes."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    import parse_diff

    from mailgw.mail.parse import parse_message

    renderer = render.Renderer(root / "templates")
    count = non_ascii = 0
    for i, (_, raw) in enumerate(parse_diff.golden_sample()):
        try:
            parsed = parse_message(raw)
        except Exception:  # not mail: no acknowledgement
            continue
        number, tag, context = parse_diff._ack_args(parsed, i)
        rendered = renderer.render("ack_new" if i % 3 else "ack_followup", context)
        refs = [*parsed.references, *([parsed.message_id] if parsed.message_id else [])][-19:]
        subject = f"{tag} {rendered.subject}"
        fast, slow = _reference(
            monkeypatch, from_addr="support@example.com", from_name="Example Support",
            to=[parsed.from_addr or "someone@example.net"], subject=subject,
            body=rendered.body, message_id=f"mailgw.{i}.1795000000.0123456789ab@example.com",
            in_reply_to=parsed.message_id, references=refs,
            extra_headers={"Auto-Submitted": "auto-replied", "X-Auto-Response-Suppress": "All",
                           "Precedence": "bulk", "X-Mailgw-Loop": "support@example.com",
                           "X-Mailgw-Ticket": number})
        monkeypatch.undo()
        assert fast == slow, (i, subject)
        count += 1
        non_ascii += not subject.isascii()
    assert count >= 300 and non_ascii >= 50, (count, non_ascii)


def test_quoted_printable_body_is_the_email_packages():
    # _qp_body stands in for Charset("utf-8").body_encode with QP (every acknowledgement's
    # body): the same text for random mixes of what the encoding treats specially: "=",
    # controls, 8-bit and non-Latin characters, whitespace at line ends, every line break,
    # lines around the 76-character limit and escapes that straddle it.
    from email.charset import QP

    reference = Charset("utf-8")
    reference.body_encoding = QP
    pieces = ["a", "b", " ", "\t", "=", "\n", "\r", "\r\n", "·", "ü", "€", "😀", "\x00", "\x0b",
              "\x0c", "\x1c", "\x7f", "\x85", "\u2028", ".", "-- ", "x" * 70, "y" * 73, " " * 3,
              "=" * 5, "é" * 30]
    rnd = random.Random(7)
    for _ in range(20000):
        text = "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 40)))
        assert render._qp_body(text) == reference.body_encode(text), repr(text)
    assert render._qp_body("") == reference.body_encode("") == ""
