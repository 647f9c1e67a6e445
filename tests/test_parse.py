"""Specs for mailgw.mail.parse (and the HTML helpers it relies on).

Every message is written inline; ``eml`` turns the text into wire bytes with CRLF line ends.
"""

from __future__ import annotations

import base64
import random
import textwrap
from datetime import UTC, datetime, timedelta, timezone

import pytest

from mailgw.mail.parse import looks_like_mail, parse_message
from mailgw.mail.sanitize import html_to_text, sanitize_html
from mailgw.types import ParsedMail, ParseError


def eml(text: str, encoding: str = "utf-8") -> bytes:
    """An inline message: dedented, leading newline dropped, CRLF line ends as on the wire."""
    return textwrap.dedent(text).lstrip("\n").replace("\n", "\r\n").encode(encoding)


SIMPLE = eml("""
    From: Alice Example <Alice@Customer.TEST>
    To: support@example.com
    Subject: Printer on fire
    Date: Tue, 02 Jan 2024 10:00:00 +0100
    Message-ID: <abc123@customer.test>

    It is on fire.
    """)


# --- What counts as mail ------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   \r\n\r\n",
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        b'{"subject": "json, not mail"}',
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
        b"Hello team,\nthe printer is on fire.\n",
    ],
    ids=["empty", "blank-lines", "png", "json", "pdf", "text-without-header"],
)
def test_input_without_a_header_block_is_not_mail(raw):
    # Given bytes that do not start with a header field
    # Then looks_like_mail says no, and parse_message raises ParseError (nothing else)
    assert looks_like_mail(raw) is False
    with pytest.raises(ParseError, match="not an email message"):
        parse_message(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"From: <joe@example.net>",  # one header, no newline, no body
        b"From MAILER-DAEMON Fri Jul  8 12:08:34 2011\nFrom: a@b.example\n\nhi\n",  # mbox line
        b"\xef\xbb\xbfSubject: saved by an editor\r\n\r\nbody\r\n",  # UTF-8 BOM
        b"\r\n  From: a@b.example\r\nSubject: indented\r\n\r\nbody\r\n",  # stray indentation
    ],
    ids=["header-only", "mbox-from-line", "bom", "leading-whitespace"],
)
def test_a_header_block_makes_mail_even_with_junk_before_it(raw):
    # Given a header block preceded by an mbox line, a BOM or whitespace
    # When it is parsed
    # Then it is mail, and the first header is read as a header, not as body text
    assert looks_like_mail(raw) is True
    parsed = parse_message(raw)
    assert isinstance(parsed, ParsedMail)
    assert parsed.headers, parsed.text


def test_leading_whitespace_before_the_first_header_keeps_that_header():
    # Given a message whose first header line is indented (enmime's bad-header-start)
    raw = b" From: James <james@example.net>\nSubject: plain text\n\nbody\n"
    # When parsed, Then From is not lost as a continuation line
    parsed = parse_message(raw)
    assert (parsed.from_addr, parsed.subject) == ("james@example.net", "plain text")


def test_garbage_after_a_header_never_raises():
    # Given 300 messages whose body and later headers are random bytes (seeded)
    rng = random.Random(2047)
    for _ in range(300):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        raw = b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n" + junk
        # When parsed, Then a ParsedMail comes back (ParseError would also be wrong here)
        assert isinstance(parse_message(raw), ParsedMail)


def test_a_truncated_multipart_parses_at_every_length():
    # Given a multipart message cut off after every possible byte
    raw = eml("""
        Subject: cut
        Content-Type: multipart/mixed; boundary="XX"

        --XX
        Content-Type: text/plain; charset=utf-8
        Content-Transfer-Encoding: quoted-printable

        caf=C3=A9 =
        ok
        --XX
        Content-Type: application/pdf; name="a.pdf"
        Content-Transfer-Encoding: base64

        JVBERi0xLjcK
        --XX--
        """)
    for end in range(len("Subject: x"), len(raw) + 1):
        # Then each prefix parses without an exception
        parse_message(raw[:end])
    # (the line break before a delimiter belongs to the delimiter, RFC 2046 §5.1.1)
    assert parse_message(raw).text == "café ok"


def test_absurdly_deep_nesting_degrades_instead_of_raising():
    # Given 3,000 nested multiparts (the stdlib parser recurses once per level)
    depth = 3000
    head = b"From: a@b.example\nSubject: deep\nContent-Type: multipart/mixed; boundary=b0\n\n"
    opening = b"".join(
        b"--b%d\nContent-Type: multipart/mixed; boundary=b%d\n\n" % (i - 1, i)
        for i in range(1, depth)
    )
    leaf = b"--b%d\nContent-Type: text/plain\n\nbottom\n" % (depth - 1)
    closing = b"".join(b"--b%d--\n" % i for i in reversed(range(depth)))
    # When parsed
    parsed = parse_message(head + opening + leaf + closing)
    # Then the headers survive and the problem is recorded
    assert parsed.subject == "deep"
    assert any("nest" in d or "not parsed" in d for d in parsed.defects), parsed.defects


# --- Headers ------------------------------------------------------------------------------


def test_simple_message_fields():
    # Given a plain message, When parsed, Then every field of the contract is filled
    parsed = parse_message(SIMPLE)
    assert parsed.from_addr == "alice@customer.test"
    assert parsed.from_name == "Alice Example"
    assert parsed.to == ["support@example.com"]
    assert parsed.subject == "Printer on fire"
    assert parsed.message_id == "abc123@customer.test"
    assert parsed.date == datetime(2024, 1, 2, 9, 0, tzinfo=UTC)
    assert parsed.date.utcoffset() == timedelta(hours=1)
    assert parsed.text == "It is on fire.\n"
    assert parsed.html is None
    assert parsed.attachments == []
    assert parsed.defects == []


def test_headers_are_lower_cased_unfolded_decoded_and_kept_in_order():
    # Given repeated, folded and encoded header fields
    raw = eml("""
        Received: from a by b; Mon, 1 Jan 2024 00:00:01 +0000
        Received: from c
         by d; Mon, 1 Jan 2024 00:00:00 +0000
        X-Note: =?utf-8?q?caf=C3=A9?=
        Subject: hi

        body
        """)
    # When parsed
    parsed = parse_message(raw)
    # Then names are lower-cased, values unfolded and decoded, order kept
    assert parsed.headers["received"] == [
        "from a by b; Mon, 1 Jan 2024 00:00:01 +0000",
        "from c by d; Mon, 1 Jan 2024 00:00:00 +0000",
    ]
    assert parsed.headers["x-note"] == ["café"]
    assert parsed.header("X-NOTE") == "café"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        # a multi-byte character split across two encoded-words, folded (RFC 2047 §6.2)
        ("=?UTF-8?B?w6nDqcOp4oKs?=\r\n =?UTF-8?B?4oKs?=", "ééé€€"),
        ("=?utf-8?B?4oK=?= =?utf-8?B?rA==?=", "€"),
        ("Re: =?iso-8859-1?q?Gr=FC=DFe_aus?= Berlin", "Re: Grüße aus Berlin"),
        ("=?ks_c_5601-1987?B?vsiz58fPvLy/5A==?=", "안녕하세요"),
        ("=?gb2312?B?suLK1A==?=", "测试"),
        ('=?"utf-8"?q?stray_quotes?=', "stray quotes"),
        ("=?charset=us-ascii?q?label_junk?=", "label junk"),
        ("=?x-unknown?q?caf=C3=A9?=", "café"),
        ("=?unknown-8bit?q?caf=E9?=", "café"),
        ("=?no-such-charset?q?caf=E9?=", "café"),
        ("=?utf-8?b?w6k?=", "é"),  # padding missing
        ("=?utf-8?b?w6*k=?=", "é"),  # a character outside the alphabet
        ("=?utf-8?x?unknown_encoding?=", "=?utf-8?x?unknown_encoding?="),
        ("=?utf-8?q?trailing_=C3?=", "trailing \ufffd"),
        ("before=?utf-8?q?_inside_?=after", "before inside after"),
    ],
)
def test_rfc2047_subjects_decode_with_charset_fallbacks(header, expected):
    # Given a Subject with encoded-words in good, bad and unknown charsets
    raw = f"Subject: {header}\r\n\r\nbody\r\n".encode()
    # When parsed, Then it decodes without raising, falling back rather than failing
    assert parse_message(raw).subject == expected


def test_raw_8bit_headers_are_utf8_or_legacy():
    # Given raw UTF-8 (RFC 6532) in one header and raw Latin-1 in another
    raw = (
        "Subject: Grüße\r\nFrom: Jöhn <j@example.com>\r\n".encode() + b"X-Old: Gr\xfc\xdfe\r\n\r\n"
    )
    # When parsed
    parsed = parse_message(raw)
    # Then both read as text, none as replacement characters
    assert parsed.subject == "Grüße"
    assert parsed.from_name == "Jöhn"
    assert parsed.header("x-old") == "Grüße"


def test_message_ids_are_bare_and_tolerant():
    # Given ids with comments, missing brackets, junk, folding and a repeat
    raw = eml("""
        Message-ID: <  id-1@host  >
        In-Reply-To: <parent@host> (Your message of Mon, 1 Jan 2024)
        References: <root@host> junk <mid@host>
         <parent@host>,<root@host>
        Subject: ids

        body
        """)
    # When parsed
    parsed = parse_message(raw)
    # Then ids are bare, oldest first, without repeats or junk
    assert parsed.message_id == "id-1@host"
    assert parsed.in_reply_to == ["parent@host"]
    assert parsed.references == ["root@host", "mid@host", "parent@host"]


def test_message_ids_without_brackets():
    # Given a mailer that forgot the angle brackets everywhere
    raw = b"Message-ID: bare@host\r\nReferences: a@host b@host\r\nIn-Reply-To: b@host\r\n\r\nx"
    # When parsed, Then the ids are still found
    parsed = parse_message(raw)
    assert (parsed.message_id, parsed.references, parsed.in_reply_to) == (
        "bare@host",
        ["a@host", "b@host"],
        ["b@host"],
    )


def test_missing_ids_are_empty_not_errors():
    # Given an empty Message-ID and an empty bracket pair, Then there are no ids, no error
    parsed = parse_message(b"Subject: no ids\r\nMessage-ID:\r\nIn-Reply-To: <>\r\n\r\nx")
    assert (parsed.message_id, parsed.in_reply_to, parsed.references) == (None, [], [])


def test_addresses_are_lower_cased_and_split_before_decoding():
    # Given an encoded display name hiding a comma, a group and odd spacing
    raw = eml("""
        From: =?utf-8?q?Doe=2C_J=C3=B6hn?= <John.Doe@Example.COM>
        To: "Support" <Support@Example.com>, other@example.org
        Cc: undisclosed-recipients:;
        Reply-To: Team: A@Example.com, b@example.com;

        x
        """)
    # When parsed
    parsed = parse_message(raw)
    # Then the comma inside the name does not split the address
    assert (parsed.from_name, parsed.from_addr) == ("Doe, Jöhn", "john.doe@example.com")
    assert parsed.to == ["support@example.com", "other@example.org"]
    assert parsed.cc == []
    assert parsed.reply_to == ["a@example.com", "b@example.com"]


def test_absent_from_gives_empty_strings():
    # Given no From header, Then the sender fields are empty strings, not None
    parsed = parse_message(b"Subject: who?\r\n\r\nx")
    assert (parsed.from_addr, parsed.from_name, parsed.to) == ("", "", [])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "Tue, 02 Jan 2024 10:00:00 -0500",
            datetime(2024, 1, 2, 10, tzinfo=timezone(timedelta(hours=-5))),
        ),
        ("2 Jan 2024 10:00 GMT", datetime(2024, 1, 2, 10, tzinfo=UTC)),
        ("<HR>", None),
        ("Wed, 15 Dec 2010    59:10 -0500", None),
        ("Pn, 29 paX 2007 21:13:00 +0100", None),
    ],
)
def test_dates_parse_tolerantly(value, expected):
    # Given a Date header, good or hopeless, Then it is a datetime or None, never an error
    parsed = parse_message(f"Date: {value}\r\n\r\nx".encode())
    assert parsed.date == expected
    if expected is None:
        assert "unparseable Date header" in parsed.defects


# --- Bodies -------------------------------------------------------------------------------


ALTERNATIVE = eml("""
    From: a@example.com
    Subject: alt
    Content-Type: multipart/alternative; boundary="alt"

    --alt
    Content-Type: text/plain; charset=iso-8859-1
    Content-Transfer-Encoding: quoted-printable

    Gr=FC=DFe
    --alt
    Content-Type: text/html; charset=utf-8

    <p onclick="evil()">Gr&uuml;&szlig;e</p><script>alert(1)</script>
    --alt--
    """)


def test_alternative_gives_plain_text_and_sanitized_html():
    # Given text and HTML alternatives
    # When parsed
    parsed = parse_message(ALTERNATIVE)
    # Then text is the plain part (decoded from Latin-1), html the sanitized HTML part,
    # and neither alternative is an attachment
    assert parsed.text == "Grüße"
    assert parsed.html is not None
    assert "Gr&uuml;&szlig;e" in parsed.html
    assert "script" not in parsed.html and "alert" not in parsed.html
    assert "onclick" not in parsed.html
    assert parsed.attachments == []


def test_html_only_mail_gets_text_from_the_html():
    # Given a message with an HTML body only
    raw = eml("""
        Subject: html
        Content-Type: text/html; charset=utf-8

        <html><head><style>p {color: red}</style><title>T</title></head>
        <body><p>Hello&nbsp;there,</p><p>line one<br>line two</p><script>x()</script></body></html>
        """)
    # When parsed, Then text is readable text without CSS, title or script
    parsed = parse_message(raw)
    assert parsed.text == "Hello there,\n\nline one\nline two"
    assert parsed.html is not None and "<p>" in parsed.html


def test_an_empty_plain_part_gives_way_to_the_html():
    # Given an empty text/plain alternative next to real HTML (some webmailers do this)
    raw = eml("""
        Content-Type: multipart/alternative; boundary=b

        --b
        Content-Type: text/plain

        --b
        Content-Type: text/html

        <div>real text</div>
        --b--
        """)
    # Then the text comes from the HTML
    assert parse_message(raw).text == "real text"


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        ("text/plain; charset=utf-8", b"caf\xe9 ok", "caf\ufffd ok"),  # invalid UTF-8
        ("text/plain; charset=us-ascii", "café".encode(), "café"),  # mislabelled UTF-8
        ("text/plain", b"caf\xe9", "café"),  # no charset, legacy 8-bit
        ("text/plain; charset=x-unknown", "café".encode(), "café"),
        ('text/plain; charset="fakescii"', b"caf\xe9", "café"),
        ("text/plain; charset=ks_c_5601-1987", "안녕".encode("cp949"), "안녕"),
        ("text/plain; charset=gb2312", "测试".encode("gb18030"), "测试"),
        ("text/plain; charset=iso-8859-1", b"\x93quoted\x94", "\u201cquoted\u201d"),
        ("text/plain; charset=base64", b"not a text codec", "not a text codec"),
    ],
)
def test_body_bytes_never_fail_to_decode(content_type, body, expected):
    # Given a body whose bytes do not match, or oddly declare, their charset
    raw = b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    # When parsed, Then it is text, with the best guess the fallbacks allow
    assert parse_message(raw).text == expected


def test_nul_characters_are_replaced():
    # Given a NUL in a header and in the body (PostgreSQL text cannot store NUL)
    parsed = parse_message(b"Subject: a\x00b\r\n\r\nx\x00y")
    # Then both are replaced visibly and the defect recorded
    assert (parsed.subject, parsed.text) == ("a\ufffdb", "x\ufffdy")
    assert "NUL characters replaced" in parsed.defects


# --- Attachments --------------------------------------------------------------------------


PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\nbinary\x00\xff"
PNG = b"\x89PNG\r\n\x1a\nfake"


def test_attachments_are_decoded_named_and_typed():
    # Given a PDF with an RFC 2231 name, a file with an RFC 2047 name, a PNG inline image
    # referenced by cid, and a PDF without any filename or disposition
    raw = eml(f"""
        From: a@example.com
        Subject: files
        Content-Type: multipart/mixed; boundary="mix"

        --mix
        Content-Type: multipart/related; boundary="rel"

        --rel
        Content-Type: text/html; charset=utf-8

        <p>See <img src="cid:logo@x"> and <img src="https://tracker.example/p.gif"></p>
        --rel
        Content-Type: image/png
        Content-ID: <logo@x>
        Content-Transfer-Encoding: base64

        {base64.b64encode(PNG).decode()}
        --rel--
        --mix
        Content-Type: application/pdf
        Content-Disposition: attachment; filename*=utf-8''R%C3%A9sum%C3%A9%20final.pdf
        Content-Transfer-Encoding: base64

        {base64.b64encode(PDF).decode()}
        --mix
        Content-Type: text/plain; name="=?utf-8?B?44Gm44GZ44GoLnR4dA==?="
        Content-Disposition: attachment

        hello
        --mix
        Content-Type: application/pdf
        Content-Transfer-Encoding: base64

        {base64.b64encode(PDF).decode()}
        --mix--
        """)
    # When parsed
    parsed = parse_message(raw)
    image, resume, text_file, unnamed = parsed.attachments
    # Then the inline image keeps its bare Content-ID and "inline" disposition
    assert (image.content_type, image.data, image.disposition) == ("image/png", PNG, "inline")
    assert image.content_id == "logo@x"
    # And names are decoded (RFC 2231, RFC 2047), payloads decoded to bytes
    assert (resume.filename, resume.data, resume.disposition) == (
        "Résumé final.pdf",
        PDF,
        "attachment",
    )
    assert (text_file.filename, text_file.data) == ("てすと.txt", b"hello")
    # And a file without a name is kept rather than dropped
    assert (unnamed.filename, unnamed.content_type, unnamed.data) == (None, "application/pdf", PDF)
    # And the HTML keeps the cid: image but not the remote tracking image
    assert 'src="cid:logo@x"' in parsed.html
    assert "tracker.example" not in parsed.html
    assert parsed.text.startswith("See")


def test_a_forwarded_message_becomes_an_eml_attachment():
    # Given a message/rfc822 part (a forwarded mail) with its own text
    raw = eml("""
        Subject: Fwd: original
        Content-Type: multipart/mixed; boundary="m"

        --m
        Content-Type: text/plain

        see below
        --m
        Content-Type: message/rfc822

        From: bob@example.com
        Subject: original

        inner body
        --m--
        """)
    # When parsed
    parsed = parse_message(raw)
    # Then the outer text is the body, and the inner message an .eml attachment with its bytes
    assert parsed.text == "see below"
    [forwarded] = parsed.attachments
    assert (forwarded.filename, forwarded.content_type) == ("message.eml", "message/rfc822")
    assert b"Subject: original" in forwarded.data
    assert b"inner body" in forwarded.data


def test_8bit_filename_is_read_from_the_raw_bytes():
    # Given a filename in raw UTF-8 bytes, against RFC 2045 (enmime's mime-bad-8bit-filename)
    raw = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: application/msword; name=\xe7\xae\xa1\xe7\x90\x86.doc\r\n\r\n"
        b"data\r\n--b--\r\n"
    )
    # Then the name is decoded, not turned into replacement characters
    assert parse_message(raw).attachments[0].filename == "管理.doc"


# --- Broken structure ---------------------------------------------------------------------


def test_a_multipart_whose_boundary_never_occurs_is_recovered_from_its_delimiters():
    # Given a boundary parameter that the body does not use (a mangled quoted boundary)
    raw = eml("""
        Subject: wrong boundary
        Content-Type: multipart/mixed; boundary="declared"

        --actual
        Content-Type: text/plain

        the text
        --actual
        Content-Type: application/octet-stream; name="f.bin"

        data
        --actual--
        """)
    # When parsed
    parsed = parse_message(raw)
    # Then the parts are found anyway, and the repair is recorded
    assert parsed.text == "the text"
    assert [a.filename for a in parsed.attachments] == ["f.bin"]
    assert "multipart/mixed boundary recovered from the body" in parsed.defects


def test_a_multipart_without_any_structure_keeps_its_text():
    # Given a multipart declaration with plain text under it
    raw = b"Content-Type: multipart/alternative\r\n\r\nJust text, no parts.\r\n"
    # Then the text is the body, not lost
    parsed = parse_message(raw)
    assert parsed.text == "Just text, no parts.\n"
    assert "NoBoundaryInMultipartDefect" in parsed.defects


# --- HTML helpers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dangerous",
    [
        "<script>alert(1)</script>",
        "<img src=x onerror=alert(1)>",
        '<a href="javascript:alert(1)">x</a>',
        '<a href="jav&#x09;ascript:alert(1)">x</a>',
        "<iframe src='https://evil.example'></iframe>",
        "<form action='https://evil.example'><input name=p></form>",
        "<div style='position:fixed;top:0'>overlay</div>",
        "<svg onload=alert(1)></svg>",
        "<style>@import 'https://evil.example/x.css'</style>",
        '<a href="/admin/delete">relative</a>',
        "<img src='https://tracker.example/pixel.gif'>",
        "<object data='https://evil.example/x.swf'></object>",
        "<meta http-equiv=refresh content='0;url=https://evil.example'>",
        "<base href='https://evil.example/'>",
    ],
)
def test_sanitize_html_removes_active_and_remote_content(dangerous):
    # Given HTML that could run code, load remote content, submit data or restyle the page
    cleaned = sanitize_html(f"<p>kept</p>{dangerous}")
    # Then none of it survives, and the harmless part does
    assert "<p>kept</p>" in cleaned
    for needle in ("alert", "javascript", "evil.example", "tracker", "style", "onerror",
                   "onload", "<form", "<input", "<iframe", "/admin", "<meta", "<base"):  # fmt: skip
        assert needle not in cleaned.lower(), (needle, cleaned)


def test_sanitize_html_keeps_structure_tables_and_safe_links():
    # Given the structure a customer's mail is made of
    html = (
        '<table border="1"><tr><td colspan="2">cell</td></tr></table>'
        "<blockquote><ul><li>item</li></ul></blockquote>"
        '<a href="https://example.com/a?b=1&amp;c=2" title="t">web</a>'
        '<a href="mailto:help@example.com">mail</a><a href="#top">anchor</a>'
    )
    # When sanitized, Then it survives unchanged
    cleaned = sanitize_html(html)
    assert '<td colspan="2">cell</td>' in cleaned
    assert "<blockquote><ul><li>item</li></ul></blockquote>" in cleaned
    assert '<a href="https://example.com/a?b=1&amp;c=2" title="t">web</a>' in cleaned
    assert '<a href="mailto:help@example.com">mail</a>' in cleaned
    assert '<a href="#top">anchor</a>' in cleaned


def test_sanitize_html_never_raises():
    # Given empty, broken, NUL-laden, very deep and invalid-reference HTML, Then a string
    for html in ["", "<", "<<>>", "<table><td><tr>", "\x00<p>\x00</p>", "<p>" * 5000, "&#xD800;"]:
        assert isinstance(sanitize_html(html), str)


def test_html_to_text_renders_blocks_entities_and_drops_code():
    # Given headings, divs, a list, a table, pre, script and entities
    html = (
        "<style>.x{}</style><h1>Title</h1><div>one</div><div>two &amp; three</div>"
        "<ul><li>a</li><li>b</li></ul><table><tr><td>c1</td><td>c2</td></tr></table>"
        "<pre>  keep\n    indent</pre><script>var x = 1;</script>end&nbsp;&lt;tag&gt;"
    )
    # Then blocks become lines, paragraphs blank lines, cells share a line, pre keeps
    # its whitespace, code disappears and entities are unescaped
    assert html_to_text(html) == (
        "Title\n\none\ntwo & three\n- a\n- b\n\nc1 c2\n\n  keep\n    indent\n\nend <tag>"
    )


def test_html_to_text_collapses_whitespace_and_never_raises():
    # Given source whitespace and unterminated constructs, Then one space / a string
    assert html_to_text("<p>  many \n\n  spaces\t here </p>") == "many spaces here"
    for html in ["", "<", "<!--", "<![CDATA[x", "</p></p>", "<script>never closed"]:
        assert isinstance(html_to_text(html), str)


def test_oversized_headers_are_truncated_with_a_defect_not_parsed_whole():
    # Given a subject of 400,000 characters made of unclosed encoded-words and a huge
    # References header without any id (both cost quadratic time to naive regexes)
    raw = (b"From: a@customer.test\r\nTo: support@example.com\r\nSubject: "
           + b"=?utf-8?q?x " * 40_000 + b"\r\nReferences: " + b"a" * 400_000
           + b" <last@customer.test>\r\n\r\nbody\r\n")
    # When it is parsed
    parsed = parse_message(raw)
    # Then both are cut to a bounded size, the cut is recorded, and the newest reference kept
    assert len(parsed.subject) <= 32 * 1024
    assert any("subject header" in d and "truncated" in d for d in parsed.defects)
    assert parsed.references == ["last@customer.test"]
    assert parsed.text.strip() == "body"
