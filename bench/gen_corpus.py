"""A reproducible mixed corpus of help desk mail for the benchmarks.

The same ``--seed`` and ``--count`` give byte-identical messages on every machine (no clock,
no host name, no ``random`` state shared with anything else). The mix, per message:

- plain text (``text/plain``) or ``multipart/alternative`` with an HTML part (about half each);
- an RFC 2047 encoded subject and sender name in about a third;
- a quoted-printable body in about a third (8bit or 7bit otherwise);
- a 200 KB attachment (``application/pdf``, base64) on 10 %;
- 40 % are replies to an earlier message of the same customer (``In-Reply-To`` and
  ``References``, or ``References`` only), which the gateway threads into that ticket.

``generate()`` returns ``[(message_id, raw_bytes)]``; the command line writes ``.eml`` files.

    .venv/bin/python bench/gen_corpus.py --count 2000 --out /tmp/mailgw-corpus
"""

from __future__ import annotations

import argparse
import base64
import quopri
import random
from datetime import UTC, datetime, timedelta
from email.header import Header
from email.utils import format_datetime, formataddr
from pathlib import Path

WORDS = ("printer invoice login password reset account order delivery refund screen error "
         "server mail access update contract license meeting urgent please thanks broken slow "
         "network VPN laptop phone backup restore billing address shipment warranty").split()
ACCENTED = ["Jürgen Müller", "Zoë Ĺukáš", "Łukasz Żółć", "Chloé Dubois", "Søren Ærø",
            "José Peña", "Ингрид Павлова", "山田 太郎", "Ümit Çelik", "Ana Lúcia"]
PLAIN_NAMES = ["Alice Smith", "Bob Jones", "Carol White", "Dan Brown", "Eve Black"]
ATTACHMENT_SIZE = 200 * 1024
START = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)


def _sentence(rnd: random.Random, n: int) -> str:
    return " ".join(rnd.choice(WORDS) for _ in range(n)).capitalize() + "."


def _paragraphs(rnd: random.Random) -> list[str]:
    return [" ".join(_sentence(rnd, rnd.randint(6, 14)) for _ in range(rnd.randint(2, 5)))
            for _ in range(rnd.randint(2, 6))]


def _html(paras: list[str]) -> str:
    body = "".join(f"<p style=\"margin:0\">{p}</p>\n" for p in paras)
    return ("<html><head><style>p{font-family:Arial}</style></head><body>\n"
            f"<div>{body}</div><p>Regards,<br><b>the customer</b></p>\n"
            "<img src=\"https://tracker.example/pixel.gif\"></body></html>\n")


def _encode_body(text: str, qp: bool) -> tuple[str, bytes]:
    data = text.replace("\n", "\r\n").encode("utf-8")
    if qp:
        return "quoted-printable", quopri.encodestring(data).replace(b"\r\n", b"\n").replace(
            b"\n", b"\r\n")
    return ("8bit" if not data.isascii() else "7bit"), data


def _part(ctype: str, text: str, qp: bool) -> bytes:
    cte, data = _encode_body(text, qp)
    return (f"Content-Type: {ctype}; charset=utf-8\r\n"
            f"Content-Transfer-Encoding: {cte}\r\n\r\n").encode() + data + b"\r\n"


def _attachment(rnd: random.Random, i: int) -> bytes:
    blob = rnd.randbytes(ATTACHMENT_SIZE)
    b64 = base64.encodebytes(blob).replace(b"\n", b"\r\n")
    return (f"Content-Type: application/pdf; name=\"report-{i}.pdf\"\r\n"
            "Content-Transfer-Encoding: base64\r\n"
            f"Content-Disposition: attachment; filename=\"report-{i}.pdf\"\r\n\r\n"
            ).encode() + b64


def generate(count: int = 2000, seed: int = 1, *,
             domain: str = "customer.test", to: str = "support@example.com",
             reply_share: float = 0.4, attachment_share: float = 0.1
             ) -> list[tuple[str, bytes]]:
    rnd = random.Random(seed)
    out: list[tuple[str, bytes]] = []
    # (message id, references chain, subject, customer index) of earlier messages
    history: list[tuple[str, list[str], str, int]] = []
    for i in range(count):
        reply = history and rnd.random() < reply_share
        encoded = rnd.random() < 1 / 3
        qp = rnd.random() < 1 / 3
        html = rnd.random() < 0.5
        attach = rnd.random() < attachment_share
        mid = f"bench.{seed}.{i}@{domain}"
        headers: list[tuple[str, str]] = []
        if reply:
            # Replies go to a recent-ish earlier message, so most originals are processed by
            # the time the reply arrives (as in real life, where replies come minutes later).
            parent_id, parent_refs, parent_subject, cust = history[
                max(0, len(history) - 1 - int(rnd.expovariate(1 / 200)))]
            subject = parent_subject if parent_subject.startswith("Re: ") else f"Re: {parent_subject}"
            refs = (parent_refs + [parent_id])[-10:]
            if rnd.random() < 0.5:
                headers.append(("In-Reply-To", f"<{parent_id}>"))
            headers.append(("References", " ".join(f"<{r}>" for r in refs)))
        else:
            cust = rnd.randrange(count // 2 + 1)
            subject = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 8))).capitalize()
            refs = []
        name = ACCENTED[cust % len(ACCENTED)] if encoded else PLAIN_NAMES[cust % len(PLAIN_NAMES)]
        addr = f"customer{cust}@{domain}"
        if encoded:
            from_value = formataddr((str(Header(name, "utf-8").encode()), addr))
            subject_value = Header(subject + " – äöü ✓", "utf-8").encode()
        else:
            from_value = formataddr((name, addr))
            subject_value = subject
        paras = _paragraphs(rnd)
        if encoded:
            paras[0] = "Grüße, bitte prüfen – " + paras[0]
        text = "\n\n".join(paras) + "\n\n-- \n" + name + "\n"
        date = START + timedelta(seconds=i * 7)
        head = [("From", from_value), ("To", to), ("Subject", subject_value),
                ("Date", format_datetime(date)), ("Message-ID", f"<{mid}>"),
                ("MIME-Version", "1.0"), *headers]
        if html:
            alt_b = f"alt-{seed}-{i}"
            alternative = (f"--{alt_b}\r\n".encode() + _part("text/plain", text, qp)
                           + f"--{alt_b}\r\n".encode() + _part("text/html", _html(paras), qp)
                           + f"--{alt_b}--\r\n".encode())
            alt_header = f"multipart/alternative; boundary=\"{alt_b}\""
        else:
            alternative = _part("text/plain", text, qp)
            alt_header = ""
        if attach:
            mix_b = f"mix-{seed}-{i}"
            if alt_header:
                first = f"Content-Type: {alt_header}\r\n\r\n".encode() + alternative
            else:
                first = alternative
            body = (f"--{mix_b}\r\n".encode() + first + f"\r\n--{mix_b}\r\n".encode()
                    + _attachment(rnd, i) + f"\r\n--{mix_b}--\r\n".encode())
            head.append(("Content-Type", f"multipart/mixed; boundary=\"{mix_b}\""))
        elif alt_header:
            body = alternative
            head.append(("Content-Type", alt_header))
        else:
            # A single part: its own headers become the message's.
            part_head, _, body = alternative.partition(b"\r\n\r\n")
            head += [tuple(h.split(": ", 1)) for h in part_head.decode().split("\r\n")]  # type: ignore[misc]
        raw = "".join(f"{k}: {v}\r\n" for k, v in head).encode() + b"\r\n" + body
        out.append((mid, raw))
        history.append((mid, refs, subject, cust))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True, help="directory for the .eml files")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    msgs = generate(args.count, args.seed)
    for i, (_, raw) in enumerate(msgs):
        (args.out / f"{i:06d}.eml").write_bytes(raw)
    size = sum(len(r) for _, r in msgs)
    replies = sum(b"\r\nReferences: " in r.split(b"\r\n\r\n", 1)[0] for _, r in msgs)
    attached = sum(b"application/pdf" in r for _, r in msgs)
    print(f"wrote {len(msgs)} messages ({size / 1e6:.1f} MB) to {args.out}: "
          f"{replies} replies, {attached} with a 200 KB attachment")


if __name__ == "__main__":
    main()
