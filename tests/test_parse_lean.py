"""The lean parse of large messages (issue 8, memory): base64 runs left in the raw bytes and
decoded from there must give exactly what the stdlib parser gives, and a big message's
attachments must reach the store byte for byte."""

from __future__ import annotations

import base64
import dataclasses
import email
import hashlib
import random
from email import policy

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgw.mail import parse
from mailgw.store import models as m
from tests.helpers import Harness


def _b64(data: bytes, width: int = 76, nl: str = "\r\n") -> str:
    text = base64.b64encode(data).decode()
    return nl.join(text[i : i + width] for i in range(0, len(text), width)) + nl


def _multipart(parts: list[str], nl: str = "\r\n", head: str = "") -> bytes:
    out = [f"From: Big <big@customer.test>{nl}To: support@example.com{nl}Subject: Logs{nl}"
           f"Message-ID: <lean.1@customer.test>{nl}{head}MIME-Version: 1.0{nl}"
           f'Content-Type: multipart/mixed; boundary="b0"{nl}{nl}preamble{nl}']
    for part in parts:
        out.append(f"--b0{nl}{part}")
    out.append(f"--b0--{nl}epilogue{nl}")
    return "".join(out).encode("utf-8", "surrogateescape")


def _attachment(name: str, data: bytes, nl: str = "\r\n", width: int = 76, cte: str = "base64",
                ctype: str = "application/octet-stream", body: str | None = None) -> str:
    return (f'Content-Type: {ctype}; name="{name}"{nl}Content-Transfer-Encoding: {cte}{nl}'
            f'Content-Disposition: attachment; filename="{name}"{nl}{nl}'
            f"{body if body is not None else _b64(data, width, nl)}")


def _text(body: str, nl: str = "\r\n") -> str:
    return f"Content-Type: text/plain; charset=utf-8{nl}{nl}{body}{nl}"


def _rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _cases() -> dict[str, bytes]:
    big, mid, small = _rnd(1_700_000, 1), _rnd(300_000, 2), _rnd(70_000, 3)
    hexdump = "\n".join(_rnd(40, i).hex().upper() for i in range(3000))
    enclosed = (b"From: inner@customer.test\r\nSubject: inner\r\nMIME-Version: 1.0\r\n"
                b'Content-Type: multipart/mixed; boundary="in"\r\n\r\n--in\r\n'
                + _attachment("inner.bin", mid).encode() + b"--in--\r\n")
    b64_mid = _b64(mid)
    return {
        "crlf": _multipart([_text("See attached."), _attachment("a.zip", big),
                            _attachment("b.png", mid), _attachment("c.pdf", small)]),
        "lf": _multipart([_text("See attached.", "\n"), _attachment("a.zip", big, "\n"),
                          _attachment("b.png", mid, "\n")], "\n"),
        # 73-character lines: runs are not whole 4-character groups, the stdlib decodes
        "odd width": _multipart([_attachment("a.bin", big, width=73)]),
        "junk in base64": _multipart([_attachment(
            "a.bin", mid, body=b64_mid[:100_000] + "!!\r\n" + b64_mid[100_000:])]),
        "padding inside": _multipart([_attachment(
            "a.bin", big, body=_b64(big[:99_998]) + _b64(big[99_998:]))]),
        "bad length": _multipart([_attachment("a.bin", mid, body=b64_mid[:-5] + "\r\n")]),
        "no final newline": _multipart([_attachment("a.bin", mid)])[:-len("--b0--\r\nepilogue\r\n")]
        .rstrip(b"\r\n"),
        "hex text, not base64": _multipart([_text(hexdump), _attachment(
            "h.txt", b"", cte="7bit", ctype="text/plain", body=hexdump + "\n")]),
        "enclosed message": _multipart([_text("Forwarded."),
                                        "Content-Type: message/rfc822\r\n\r\n"
                                        + enclosed.decode()]),
        "base64 body text": _multipart([
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + _b64(("Zeile äöü\n" * 20_000).encode())]),
        "forged placeholder": _multipart([_text("a\x00deadbeefdeadbeef:0\x00b"),
                                          _attachment("a.bin", mid)]),
        "missing boundary": (b"From: x@customer.test\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
                             b"Content-Type: multipart/mixed\r\n\r\n--zz\r\n"
                             + _attachment("a.bin", mid).encode() + b"--zz--\r\n"),
        "8-bit bytes": _multipart([_text("caf\xe9 na\xefve".encode("latin-1").decode(
            "utf-8", "surrogateescape")), _attachment("a.bin", mid)]),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_lean_parse_gives_what_the_stdlib_parse_gives(name, monkeypatch):
    raw = CASES[name]
    lean = parse.parse_message(raw)
    with monkeypatch.context() as mp:
        mp.setattr(parse, "_parse_tree", lambda data, start=0: email.message_from_bytes(
            data[start:], policy=policy.compat32))
        reference = parse.parse_message(raw)
    assert dataclasses.asdict(lean) == dataclasses.asdict(reference)


def test_long_base64_runs_stay_in_the_raw_bytes():
    raw = CASES["crlf"]
    msg = parse._parse_tree(raw)
    leaves = [p for p in msg.walk() if not p.is_multipart()]
    # The three attachments were decoded from the raw bytes; no part holds their text.
    assert [len(getattr(p, "_mailgw_data", None) or b"") for p in leaves] == [
        0, 1_700_000, 300_000, 70_000]
    assert sum(len(p.get_payload()) for p in leaves) < 100


def test_a_big_message_reaches_the_store_byte_for_byte(home):
    data = [_rnd(3_000_000, 11), _rnd(1_500_000, 12), _rnd(200_001, 13)]
    raw = _multipart([_text("Three files."), *(
        _attachment(f"f{i}.bin", d) for i, d in enumerate(data))])
    hx = Harness(home)
    try:
        [iid] = hx.put(raw)
        hx.drain()
        assert hx.inbound(iid).state == "done"
        with Session(hx.engine) as s:
            stored = s.execute(select(m.Attachment.filename, m.Attachment.size,
                                      m.Attachment.data).order_by(m.Attachment.id)).all()
            assert s.scalar(select(m.Inbound.raw).where(m.Inbound.id == iid)) == raw
        assert [(f, n) for f, n, _ in stored] == [(f"f{i}.bin", len(d)) for i, d in
                                                  enumerate(data)]
        assert [hashlib.sha256(d).hexdigest() for _, _, d in stored] == [
            hashlib.sha256(d).hexdigest() for d in data]
    finally:
        hx.close()
