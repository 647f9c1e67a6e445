"""The cost floor of the stack: what each part the brief mandates costs a message, at least.

Issue 8 asks for 1,000 messages/s durable end to end on two cores, i.e. 2 ms of CPU a
message for everything. This measures, on the benchmark corpus (``gen_corpus.generate``),
each mandated part alone, with nothing of mailgw's own logic around it, as CPU ms a message
(``time.process_time`` / ``getrusage``: user and system apart; the median of ``--rounds``):

a. SMTP receive over loopback: an aiosmtpd server in a child process whose handler does
   nothing (plain aiosmtpd, and aiosmtpd with mailgw's bulk ``DATA`` reader and address
   regex), fed by ``smtplib`` (one thread per connection, as ``smtp_bench.py``) and by the
   lean asyncio client (``lean_smtp.py``, lock-step and pipelined); server and client CPU
   apart.
b. The stdlib parser: ``email.message_from_bytes`` with ``policy.default`` and ``compat32``,
   then the headers a ticket needs, every part walked and its payload decoded (text to str).
c. bleach on the HTML parts: ``bleach.clean`` (a new Cleaner per call, as the function does)
   and one ``Cleaner`` reused, with mailgw's allow-lists; per corpus message (all messages,
   with or without HTML).
d. SQLite durable insert, WAL, ``synchronous=FULL``: the raw message, one ticket, one
   article and one outbox row (the acknowledgement's bytes), groups of 16 a transaction,
   with SQLAlchemy Core and with the ORM; and the way the brief's "ack only when durable"
   needs it: the raw message committed first (intake), then ticket, article, outbox and
   the inbound row's ``done`` in a second transaction (processing). A minimal schema (the
   indexes a help desk needs for threading and the outbox) and mailgw's full schema.
e. The acknowledgement: Jinja2 render of ``templates/ack_new.j2`` (compiled once, blocks
   as ``mailgw/outbound/render.py`` renders them) and ``email.message.EmailMessage``
   serialization (and the compat32 ``Message`` mailgw uses, for comparison).
f. Sending the acknowledgements with ``smtplib`` over one connection (the sender's way) to a
   do-nothing aiosmtpd sink in a child process, and to ``lean_smtp.LeanSink``: both sides.
g. The kernel: the system part of every figure above, and the machine's softirq time
   (``/proc/stat``, all cores, so other load on the machine counts too) during a and f.

    .venv/bin/python bench/floor.py --count 1000 --rounds 5
    .venv/bin/python bench/floor.py --count 1000 --parts a,f --json
"""

from __future__ import annotations

import argparse
import email
import email.policy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gen_corpus import generate  # noqa: E402
from lean_smtp import LeanSink, send_all, wire_data  # noqa: E402

HEADERS = ("From", "To", "Cc", "Subject", "Date", "Message-ID", "In-Reply-To", "References",
           "Reply-To", "Auto-Submitted", "Precedence")
GROUP = 16
# Messages per intake commit: at most one per SMTP session waiting for its 250 (8 lock-step
# connections: 8 at the very most; mailgw measured 3-7). Set by --intake-group.
INTAKE_GROUP = 8


def cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def softirq() -> float:
    """Seconds of softirq (and irq) time over all cores since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return (int(fields[5]) + int(fields[6])) / os.sysconf("SC_CLK_TCK")


class Figure:
    """user/sys CPU ms a message of one measured step, median over rounds."""

    def __init__(self) -> None:
        self.user: list[float] = []
        self.sys: list[float] = []
        self.wall: list[float] = []

    def add(self, user: float, sys_: float, n: int, wall: float = 0.0) -> None:
        self.user.append(user * 1000 / n)
        self.sys.append(sys_ * 1000 / n)
        self.wall.append(wall * 1000 / n)

    def med(self) -> dict[str, float]:
        # Every part runs one round more than --rounds; the first warms up (imports, caches,
        # compiled regexes, the server's first connections) and is not counted.
        k = 1 if len(self.user) > 1 else 0
        user, sys_, wall = self.user[k:], self.sys[k:], self.wall[k:]
        tot = [u + s for u, s in zip(user, sys_, strict=True)]
        return {"ms": statistics.median(tot), "user": statistics.median(user),
                "sys": statistics.median(sys_), "wall": statistics.median(wall),
                "min": min(tot), "max": max(tot), "rounds": len(tot)}


def timed(fig: Figure, n: int, fn: Callable[[], object]) -> object:
    u0, s0 = cpu()
    w0 = time.perf_counter()
    out = fn()
    w1 = time.perf_counter()
    u1, s1 = cpu()
    fig.add(u1 - u0, s1 - s0, n, w1 - w0)
    return out


# --- a, f: SMTP ---------------------------------------------------------------------------

def serve(kind: str) -> None:
    """Child process: an SMTP server on a free loopback port whose handler does nothing.
    Prints the port; then each line on stdin is answered with this process's user and
    system CPU seconds; end of file stops it."""
    import asyncio

    from aiosmtpd.smtp import SMTP

    class Null:
        async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
            return "250 OK queued as 1"

    # The corpus has lines longer than RFC 5321's 1,000 octets (as real mail does); the
    # gateway accepts them (decision 11), so both servers take lines of up to 256 KiB.
    cls = type("Plain", (SMTP,), {"line_length_limit": 256 * 1024})
    if kind == "mailgw":  # mailgw's bulk DATA reader and address regex on aiosmtpd
        from mailgw.intake.smtp import READ_PIECE, _BulkData, _FastAddress

        cls = type("Protocol", (_FastAddress, _BulkData, SMTP), {"line_length_limit": READ_PIECE})
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(
        lambda: cls(Null(), hostname="floor", decode_data=False, enable_SMTPUTF8=True,
                    data_size_limit=64 << 20),
        "127.0.0.1", 0))
    print(server.sockets[0].getsockname()[1], flush=True)

    def control() -> None:
        if not sys.stdin.readline():
            loop.stop()
            return
        u, s = cpu()
        print(f"{u} {s}", flush=True)

    loop.add_reader(sys.stdin.fileno(), control)
    loop.run_forever()


class Server:
    def __init__(self, kind: str) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", kind],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.port = int(self.proc.stdout.readline())

    def cpu(self) -> tuple[float, float]:
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        u, s = self.proc.stdout.readline().split()
        return float(u), float(s)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def smtplib_send(port: int, msgs: list[tuple[str, bytes]], connections: int,
                 timeout: float = 60) -> None:
    """Send ``msgs`` over ``connections`` smtplib sessions, one thread each (the default
    load generator's client; also bench/profile_gateway.py). Raises SystemExit on any
    refusal or error."""
    import smtplib

    errors: list[str] = []

    def client(chunk: list[tuple[str, bytes]]) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as s:
                s.ehlo()
                for _, raw in chunk:
                    s.mail("bench@customer.test")
                    s.rcpt("support@example.com")
                    code, resp = s.data(raw)
                    if code != 250:
                        errors.append(f"{code} {resp!r}")
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    if connections == 1:
        client(msgs)
    else:
        threads = [threading.Thread(target=client, args=(msgs[k::connections],))
                   for k in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise SystemExit(f"send errors: {errors[:3]}")


def measure_smtp(figs: dict[str, Figure], prefix: str, server: Server | None, sink: LeanSink | None,
                 send: Callable[[int], None], n: int) -> None:
    """One round: client CPU (this process), server CPU (the child or, for the lean sink,
    its thread), softirq of the machine."""
    port = server.port if server else sink.port  # type: ignore[union-attr]
    sv0 = server.cpu() if server else (_thread_cpu(sink), 0.0)
    irq0 = softirq()
    u0, s0 = cpu()
    w0 = time.perf_counter()
    send(port)
    w1 = time.perf_counter()
    u1, s1 = cpu()
    irq1 = softirq()
    sv1 = server.cpu() if server else (_thread_cpu(sink), 0.0)
    if sink is not None:  # the sink's thread is in this process: take it out of the client
        su = sv1[0] - sv0[0]
        figs.setdefault(f"{prefix} client", Figure()).add(u1 - u0 + s1 - s0 - su, 0.0, n, w1 - w0)
        figs.setdefault(f"{prefix} server", Figure()).add(su, 0.0, n)
    else:
        figs.setdefault(f"{prefix} client", Figure()).add(u1 - u0, s1 - s0, n, w1 - w0)
        figs.setdefault(f"{prefix} server", Figure()).add(sv1[0] - sv0[0], sv1[1] - sv0[1], n)
    figs.setdefault(f"{prefix} softirq (machine)", Figure()).add(0.0, irq1 - irq0, n)


def _thread_cpu(sink: LeanSink) -> float:
    from smtp_bench import thread_cpu_s

    return thread_cpu_s(sink.thread)


def part_a(corpus, rounds: int, connections: int) -> dict[str, Figure]:  # type: ignore[no-untyped-def]
    figs: dict[str, Figure] = {}
    n = len(corpus)
    # The lean client's payloads are dot-stuffed once, before the clock (a load generator
    # prepares its messages beforehand); smtplib stuffs each message in data(), as it does
    # in smtp_bench.py.
    wired = [(mid, wire_data(raw)) for mid, raw in corpus]
    for kind in ("aiosmtpd", "mailgw"):
        server = Server("plain" if kind == "aiosmtpd" else "mailgw")
        try:
            for _ in range(rounds + 1):
                measure_smtp(figs, f"a {kind} <- smtplib x{connections}", server, None,
                             lambda p: smtplib_send(p, corpus, connections), n)
                measure_smtp(figs, f"a {kind} <- lean x{connections}", server, None,
                             lambda p: send_all("127.0.0.1", p, wired, connections=connections,
                                                wired=True), n)
                measure_smtp(figs, f"a {kind} <- pipelined x{connections}", server, None,
                             lambda p: send_all("127.0.0.1", p, wired, connections=connections,
                                                pipeline=True, wired=True), n)
        finally:
            server.close()
    return figs


def part_f(acks, rounds: int) -> dict[str, Figure]:  # type: ignore[no-untyped-def]
    figs: dict[str, Figure] = {}
    n = len(acks)
    msgs = [("", a) for a in acks]
    server = Server("plain")
    sink = LeanSink()
    sink.start()
    try:
        for _ in range(rounds + 1):
            measure_smtp(figs, "f smtplib x1 -> aiosmtpd sink", server, None,
                         lambda p: smtplib_send(p, msgs, 1), n)
            measure_smtp(figs, "f smtplib x1 -> lean sink (thread)", None, sink,
                         lambda p: smtplib_send(p, msgs, 1), n)
    finally:
        server.close()
        sink.stop()
    return figs


# --- b, c: parsing and sanitising ---------------------------------------------------------

def walk(msg, policy_default: bool) -> int:  # type: ignore[no-untyped-def]
    """The headers a ticket needs, then every leaf part's payload decoded (text to str)."""
    size = 0
    for h in HEADERS:
        v = msg.get(h)
        if v is not None:
            size += len(str(v))
    for part in msg.walk():
        if part.is_multipart():
            continue
        if policy_default:
            try:
                content = part.get_content()
            except (LookupError, ValueError):
                content = part.get_payload(decode=True) or b""
            size += len(content)
            continue
        data = part.get_payload(decode=True) or b""
        if part.get_content_maintype() == "text":
            data = data.decode(part.get_content_charset() or "us-ascii", "replace")
        size += len(data)
    return size


def html_parts(raw: bytes) -> list[str]:
    msg = email.message_from_bytes(raw)
    out = []
    for part in msg.walk():
        if part.get_content_type() == "text/html":
            data = part.get_payload(decode=True) or b""
            out.append(data.decode(part.get_content_charset() or "us-ascii", "replace"))
    return out


def part_b(corpus, rounds: int) -> dict[str, Figure]:  # type: ignore[no-untyped-def]
    figs: dict[str, Figure] = {}
    raws = [raw for _, raw in corpus]
    n = len(raws)
    pols = (("compat32", email.policy.compat32), ("policy.default", email.policy.default))
    for _ in range(rounds + 1):
        for name, pol in pols:
            timed(figs.setdefault(f"b parse {name}", Figure()), n,
                  lambda pol=pol: [email.message_from_bytes(r, policy=pol) for r in raws])
            timed(figs.setdefault(f"b parse {name} + headers, walk, decode", Figure()), n,
                  lambda pol=pol, name=name: [walk(email.message_from_bytes(r, policy=pol),
                                                   name != "compat32") for r in raws])
    return figs


def part_c(corpus, rounds: int) -> dict[str, Figure]:  # type: ignore[no-untyped-def]
    import bleach
    from bleach.sanitizer import Cleaner

    from mailgw.mail.sanitize import ALLOWED_ATTRIBUTES, ALLOWED_PROTOCOLS, ALLOWED_TAGS

    figs: dict[str, Figure] = {}
    per_msg = [html_parts(raw) for _, raw in corpus]
    n = len(per_msg)
    kw = {"tags": ALLOWED_TAGS, "attributes": ALLOWED_ATTRIBUTES, "protocols": ALLOWED_PROTOCOLS,
          "strip": True, "strip_comments": True}
    cleaner = Cleaner(**kw)
    for _ in range(rounds + 1):
        timed(figs.setdefault("c bleach.clean (new Cleaner a call)", Figure()), n,
              lambda: [bleach.clean(h, **kw) for hs in per_msg for h in hs])
        timed(figs.setdefault("c bleach Cleaner reused", Figure()), n,
              lambda: [cleaner.clean(h) for hs in per_msg for h in hs])
    with_html = sum(1 for hs in per_msg if hs)
    figs["c bleach Cleaner reused"].note = (  # type: ignore[attr-defined]
        f"{with_html} of {n} messages have HTML")
    return figs


# --- e: the acknowledgement ---------------------------------------------------------------

def ack_inputs(corpus) -> list[dict]:  # type: ignore[no-untyped-def]
    """What the template and the headers need, from a compat32 parse (not timed)."""
    from email.header import decode_header, make_header
    from email.utils import parseaddr

    out = []
    for k, (mid, raw) in enumerate(corpus):
        msg = email.message_from_bytes(raw)
        subject = str(make_header(decode_header(msg.get("Subject", ""))))
        name, addr = parseaddr(str(make_header(decode_header(msg.get("From", "")))))
        text = ""
        for part in msg.walk():
            if part.get_content_type() == "text/plain":
                text = (part.get_payload(decode=True) or b"").decode(
                    part.get_content_charset() or "us-ascii", "replace")
                break
        number = f"2026112710{k + 1:06d}"
        out.append({"mid": mid, "subject": subject, "from_name": name, "from_addr": addr,
                    "text": text, "number": number})
    return out


def render_all(inputs, env) -> list[tuple[str, str, dict]]:  # type: ignore[no-untyped-def]
    tmpl = env.get_template("ack_new.j2")
    out = []
    for x in inputs:
        tag = f"[Ticket#{x['number']}]"
        ctx = tmpl.new_context({
            "ticket": {"number": x["number"], "title": x["subject"], "queue": "support",
                       "state": "new"},
            "article": {"subject": x["subject"], "from_addr": x["from_addr"],
                        "from_name": x["from_name"], "text": x["text"]},
            "queue": {"name": "Support", "address": "support@example.com"},
            "customer": x["from_addr"], "tag": tag})
        subject = " ".join("".join(tmpl.blocks["subject"](ctx)).split())
        body = "".join(tmpl.blocks["body"](ctx)).strip("\n") + "\n"
        out.append((f"{subject} {tag}", body, x))
    return out


def build_email_message(rendered) -> list[bytes]:  # type: ignore[no-untyped-def]
    from email.message import EmailMessage
    from email.utils import formataddr

    out = []
    for k, (subject, body, x) in enumerate(rendered):
        m = EmailMessage()
        m["From"] = formataddr(("Support", "support@example.com"))
        m["To"] = formataddr((x["from_name"], x["from_addr"]))
        m["Subject"] = subject
        m["Date"] = "Fri, 27 Nov 2026 05:00:00 +0000"
        m["Message-ID"] = f"<mailgw.{k}.1795000000.0123456789ab@example.com>"
        m["In-Reply-To"] = f"<{x['mid']}>"
        m["References"] = f"<{x['mid']}>"
        m["Auto-Submitted"] = "auto-replied"
        m["X-Loop"] = "support@example.com"
        m.set_content(body)
        out.append(m.as_bytes())
    return out


def build_compat32(rendered) -> list[bytes]:  # type: ignore[no-untyped-def]
    from email.charset import QP, Charset
    from email.header import Header
    from email.message import Message
    from email.utils import formataddr

    cs = Charset("utf-8")
    cs.body_encoding = QP
    out = []
    for k, (subject, body, x) in enumerate(rendered):
        m = Message()
        m["From"] = formataddr(("Support", "support@example.com"))
        m["To"] = formataddr((x["from_name"], x["from_addr"]), "utf-8")
        m["Subject"] = subject if subject.isascii() else Header(subject, "utf-8").encode()
        m["Date"] = "Fri, 27 Nov 2026 05:00:00 +0000"
        m["Message-ID"] = f"<mailgw.{k}.1795000000.0123456789ab@example.com>"
        m["In-Reply-To"] = f"<{x['mid']}>"
        m["References"] = f"<{x['mid']}>"
        m["Auto-Submitted"] = "auto-replied"
        m["X-Loop"] = "support@example.com"
        m["MIME-Version"] = "1.0"
        m.set_payload(body, cs)
        out.append(m.as_bytes())
    return out


def part_e(corpus, rounds: int) -> tuple[dict[str, Figure], list[bytes]]:  # type: ignore[no-untyped-def]
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    figs: dict[str, Figure] = {}
    inputs = ack_inputs(corpus)
    n = len(inputs)
    env = Environment(loader=FileSystemLoader(str(ROOT / "templates")), undefined=StrictUndefined,
                      autoescape=False, keep_trailing_newline=True, auto_reload=False)
    rendered = render_all(inputs, env)  # compiles once, outside the timing
    acks: list[bytes] = []
    for _ in range(rounds + 1):
        rendered = timed(figs.setdefault("e Jinja2 render (ack_new.j2)", Figure()), n,
                         lambda: render_all(inputs, env))  # type: ignore[assignment]
        acks = timed(figs.setdefault("e EmailMessage + as_bytes", Figure()), n,
                     lambda rendered=rendered: build_email_message(rendered))  # type: ignore[assignment]
        timed(figs.setdefault("e compat32 Message + as_bytes (mailgw's way)", Figure()), n,
              lambda rendered=rendered: build_compat32(rendered))
    return figs, acks


# --- d: the durable insert ----------------------------------------------------------------

def store_rows(corpus, acks: list[bytes]) -> list[dict]:  # type: ignore[no-untyped-def]
    import hashlib

    inputs = ack_inputs(corpus)
    rows = []
    for (mid, raw), x, ack in zip(corpus, inputs, acks, strict=True):
        rows.append({"raw": raw, "sha256": hashlib.sha256(raw).hexdigest(), "mid": mid,
                     "subject": x["subject"], "from_addr": x["from_addr"], "text": x["text"],
                     "number": x["number"], "ack": ack,
                     "ack_mid": f"mailgw.{x['number']}.1795000000@example.com"})
    return rows


def minimal_metadata():  # type: ignore[no-untyped-def]
    from sqlalchemy import (
        Column,
        DateTime,
        ForeignKey,
        Index,
        Integer,
        LargeBinary,
        MetaData,
        String,
        Table,
        Text,
    )

    md = MetaData()
    Table("inbound", md, Column("id", Integer, primary_key=True),
          Column("received_at", DateTime), Column("mail_from", String(998)),
          Column("rcpt_to", String(998)), Column("sha256", String(64), index=True),
          Column("raw", LargeBinary), Column("state", String(16)),
          Column("ticket_id", ForeignKey("tickets.id")))
    Table("tickets", md, Column("id", Integer, primary_key=True),
          Column("number", String(40), unique=True), Column("title", String(1000)),
          Column("queue", String(64)), Column("state", String(16)),
          Column("customer", String(998)), Column("created_at", DateTime),
          Column("updated_at", DateTime))
    Table("articles", md, Column("id", Integer, primary_key=True),
          Column("ticket_id", ForeignKey("tickets.id"), index=True),
          Column("message_id", String(998), index=True), Column("direction", String(8)),
          Column("from_addr", String(998)), Column("subject", String(1000)),
          Column("body_text", Text), Column("created_at", DateTime))
    outbox = Table("outbox", md, Column("id", Integer, primary_key=True),
                   Column("ticket_id", ForeignKey("tickets.id")),
                   Column("article_id", ForeignKey("articles.id")),
                   Column("mail_from", String(998)), Column("rcpt_to", String(998)),
                   Column("raw", LargeBinary), Column("state", String(16)),
                   Column("attempts", Integer), Column("next_attempt_at", DateTime))
    Index("ix_outbox_due", outbox.c.state, outbox.c.next_attempt_at)
    return md


def sqlite_engine(path: Path):  # type: ignore[no-untyped-def]
    from sqlalchemy import create_engine, event

    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _rec) -> None:  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None  # transactions by hand: BEGIN IMMEDIATE
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute("PRAGMA synchronous=FULL")

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def core_groups(engine, md, rows: list[dict], two_tx: bool, full: bool = False) -> None:  # type: ignore[no-untyped-def]
    """Groups of GROUP messages: inbound, tickets, articles (customer's and ack), outbox;
    ids taken by the application (as mailgw's decision 23), so each table is one
    executemany. ``two_tx``: the inbound rows commit first (intake: ack only when durable),
    then the rest and the inbound row's ``done`` in a second transaction. ``full``: also a
    threading look-up a message (an indexed SELECT on ``articles.message_id``) in the
    processing transaction, and the sender's ``sent`` mark of the group's outbox rows in a
    third one: every write the durable path needs, at the least."""
    from datetime import UTC, datetime

    from sqlalchemy import bindparam, insert, select, update

    inbound, tickets, articles, outbox = (md.tables[t] for t in
                                          ("inbound", "tickets", "articles", "outbox"))
    now = datetime.now(UTC)
    done = update(inbound).where(inbound.c.id == bindparam("b_id")).values(
        state="done", ticket_id=bindparam("b_ticket"))
    thread_q = select(articles.c.ticket_id).where(articles.c.message_id == bindparam("mid"))
    sent = update(outbox).where(outbox.c.id.in_(bindparam("ids", expanding=True))).values(
        state="sent")
    with engine.connect() as c:
        base = c.exec_driver_sql("SELECT coalesce(max(id), 0) FROM inbound").scalar()
    for g in range(0, len(rows), GROUP):
        group = rows[g:g + GROUP]
        ids = range(base + g + 1, base + g + 1 + len(group))
        in_rows = [{"id": i, "received_at": now, "mail_from": "bench@customer.test",
                    "rcpt_to": "support@example.com", "sha256": r["sha256"], "raw": r["raw"],
                    "state": "pending" if two_tx else "done", "ticket_id": None if two_tx else i}
                   for i, r in zip(ids, group, strict=True)]
        if two_tx:
            for k in range(0, len(in_rows), INTAKE_GROUP):
                with engine.begin() as c:
                    c.execute(insert(inbound), in_rows[k:k + INTAKE_GROUP])
        with engine.begin() as c:
            if not two_tx:
                c.execute(insert(inbound), in_rows)
            if full:
                for r in group:
                    c.execute(thread_q, {"mid": r["mid"]}).first()
            c.execute(insert(tickets), [
                {"id": i, "number": r["number"], "title": r["subject"], "queue": "support",
                 "state": "new", "customer": r["from_addr"], "created_at": now, "updated_at": now}
                for i, r in zip(ids, group, strict=True)])
            c.execute(insert(articles), [
                {"id": 2 * i + d, "ticket_id": i, "message_id": mid, "direction": dr,
                 "from_addr": fa, "subject": r["subject"], "body_text": body, "created_at": now}
                for i, r in zip(ids, group, strict=True)
                for d, mid, dr, fa, body in ((0, r["mid"], "in", r["from_addr"], r["text"]),
                                             (1, r["ack_mid"], "out", "support@example.com",
                                              ""))])
            c.execute(insert(outbox), [
                {"id": i, "ticket_id": i, "article_id": 2 * i + 1,
                 "mail_from": "bounces@example.com", "rcpt_to": r["from_addr"], "raw": r["ack"],
                 "state": "queued", "attempts": 0, "next_attempt_at": now}
                for i, r in zip(ids, group, strict=True)])
            if two_tx:
                c.execute(done, [{"b_id": i, "b_ticket": i} for i in ids])
        if full:
            with engine.begin() as c:
                c.execute(sent, {"ids": list(ids)})


def orm_groups(engine, md, rows: list[dict]) -> None:  # type: ignore[no-untyped-def]
    """The same rows through the ORM: objects with relationships, ids left to the ORM (it
    flushes parents first to learn them), one commit a group."""
    from datetime import UTC, datetime

    from sqlalchemy.orm import Session

    inb_cls, tk_cls, ar_cls, ob_cls = _orm_classes(md)
    now = datetime.now(UTC)
    for g in range(0, len(rows), GROUP):
        with Session(engine) as s, s.begin():
            for r in rows[g:g + GROUP]:
                t = tk_cls(number=r["number"], title=r["subject"], queue="support", state="new",
                           customer=r["from_addr"], created_at=now, updated_at=now)
                s.add(inb_cls(received_at=now, mail_from="bench@customer.test",
                              rcpt_to="support@example.com", sha256=r["sha256"], raw=r["raw"],
                              state="done", ticket=t))
                s.add(ar_cls(ticket=t, message_id=r["mid"], direction="in",
                             from_addr=r["from_addr"], subject=r["subject"], body_text=r["text"],
                             created_at=now))
                ack = ar_cls(ticket=t, message_id=r["ack_mid"], direction="out",
                             from_addr="support@example.com", subject=r["subject"], body_text="",
                             created_at=now)
                s.add(ob_cls(ticket=t, article=ack, mail_from="bounces@example.com",
                             rcpt_to=r["from_addr"], raw=r["ack"], state="queued", attempts=0,
                             next_attempt_at=now))


_ORM: dict[int, tuple] = {}


def _orm_classes(md):  # type: ignore[no-untyped-def]
    from sqlalchemy.orm import registry, relationship

    if id(md) in _ORM:
        return _ORM[id(md)]
    reg = registry()

    class Inbound:
        pass

    class Ticket:
        pass

    class Article:
        pass

    class Outbox:
        pass

    reg.map_imperatively(Ticket, md.tables["tickets"])
    reg.map_imperatively(Inbound, md.tables["inbound"], properties={
        "ticket": relationship(Ticket)})
    reg.map_imperatively(Article, md.tables["articles"], properties={
        "ticket": relationship(Ticket)})
    reg.map_imperatively(Outbox, md.tables["outbox"], properties={
        "ticket": relationship(Ticket), "article": relationship(Article)})
    _ORM[id(md)] = (Inbound, Ticket, Article, Outbox)
    return _ORM[id(md)]


def mailgw_groups(engine, rows: list[dict], two_tx: bool) -> None:  # type: ignore[no-untyped-def]
    """The same as core_groups into mailgw's own schema (every index and column of
    mailgw/store/models.py), Core, ids by the application."""
    from datetime import UTC, datetime

    from sqlalchemy import bindparam, insert, update

    from mailgw.store import models as m

    now = datetime.now(UTC)
    inbound, tickets = m.Inbound.__table__, m.Ticket.__table__
    articles, outbox = m.Article.__table__, m.Outbox.__table__
    done = update(inbound).where(inbound.c.id == bindparam("b_id")).values(
        state="done", ticket_id=bindparam("b_ticket"))
    with engine.connect() as c:
        base = c.exec_driver_sql("SELECT coalesce(max(id), 0) FROM inbound").scalar()
    for g in range(0, len(rows), GROUP):
        group = rows[g:g + GROUP]
        ids = range(base + g + 1, base + g + 1 + len(group))
        in_rows = [{"id": i, "source": "smtp", "mail_from": "bench@customer.test",
                    "rcpt_tos": ["support@example.com"], "size": len(r["raw"]),
                    "sha256": r["sha256"], "raw": r["raw"],
                    "state": "pending" if two_tx else "done", "attempts": 0,
                    "received_at": now}
                   for i, r in zip(ids, group, strict=True)]
        in_rows = [{k: v for k, v in row.items() if k in inbound.c} for row in in_rows]
        if two_tx:
            for k in range(0, len(in_rows), INTAKE_GROUP):
                with engine.begin() as c:
                    c.execute(insert(inbound), in_rows[k:k + INTAKE_GROUP])
        with engine.begin() as c:
            if not two_tx:
                c.execute(insert(inbound), in_rows)
            c.execute(insert(tickets), [_fill(tickets, {
                "id": i, "number": r["number"], "title": r["subject"], "queue": "support",
                "state": "new", "customer": r["from_addr"], "created_at": now,
                "updated_at": now}) for i, r in zip(ids, group, strict=True)])
            c.execute(insert(articles), [_fill(articles, {
                "id": 2 * i + d, "ticket_id": i, "message_id": mid, "direction": dr,
                "sender_type": "customer" if dr == "in" else "system", "threaded_by": "new",
                "from_addr": fa, "subject": r["subject"], "body_text": body,
                "created_at": now})
                for i, r in zip(ids, group, strict=True)
                for d, mid, dr, fa, body in ((0, r["mid"], "in", r["from_addr"], r["text"]),
                                             (1, r["ack_mid"], "out", "support@example.com",
                                              ""))])
            c.execute(insert(outbox), [_fill(outbox, {
                "id": i, "ticket_id": i, "article_id": 2 * i + 1,
                "mail_from": "bounces@example.com", "rcpt_to": r["from_addr"],
                "rcpt_tos": [r["from_addr"]], "message_id": r["ack_mid"], "raw": r["ack"],
                "state": "pending",
                "attempts": 0, "next_attempt_at": now, "created_at": now})
                for i, r in zip(ids, group, strict=True)])
            if two_tx:
                c.execute(done, [{"b_id": i, "b_ticket": i} for i in ids])


def _fill(table, values: dict) -> dict:  # type: ignore[no-untyped-def]
    """``values`` for the columns the table has (the rest take their defaults)."""
    return {k: v for k, v in values.items() if k in table.c}


def part_d(corpus, acks: list[bytes], rounds: int, tmp: Path) -> dict[str, Figure]:  # type: ignore[no-untyped-def]
    figs: dict[str, Figure] = {}
    rows = store_rows(corpus, acks)
    n = len(rows)
    for r in range(rounds + 1):
        for name in ("Core, one tx", "Core, intake tx + processing tx",
                     "Core, intake + processing with look-ups + sent mark", "ORM, one tx",
                     "mailgw schema, Core, one tx", "mailgw schema, Core, intake + processing"):
            path = tmp / f"d{r}-{len(figs)}.db"
            engine = sqlite_engine(path)
            if name.startswith("mailgw"):
                from mailgw.store import models as m

                md = m.Base.metadata
            else:
                md = minimal_metadata()
            md.create_all(engine)
            two = "processing" in name
            if name.startswith("mailgw"):
                fn = lambda e=engine, two=two: mailgw_groups(e, rows, two)  # noqa: E731
            elif name.startswith("ORM"):
                fn = lambda e=engine, md=md: orm_groups(e, md, rows)  # noqa: E731
            else:
                full = "sent mark" in name
                fn = lambda e=engine, md=md, two=two, full=full: core_groups(  # noqa: E731
                    e, md, rows, two or full, full)
            label = (f"d SQLite {name} (groups of {GROUP}, intake {INTAKE_GROUP})" if two or (
                "sent mark" in name) else f"d SQLite {name} (groups of {GROUP})")
            timed(figs.setdefault(label, Figure()), n, fn)
            engine.dispose()
            for p in tmp.glob(f"{path.name}*"):
                p.unlink()
    return figs


# --- the report ---------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=1000, help="corpus size (gen_corpus)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=8, help="SMTP sessions in part a")
    ap.add_argument("--parts", default="a,b,c,d,e,f", help="which parts (comma-separated)")
    ap.add_argument("--intake-group", type=int, default=INTAKE_GROUP,
                    help="messages per intake commit in part d (at most --connections: one "
                         "per session waiting for its 250; default %(default)s)")
    ap.add_argument("--json", action="store_true", help="all figures as one JSON object")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return
    parts = set(args.parts.split(","))
    globals()["INTAKE_GROUP"] = max(1, min(args.intake_group, args.connections))
    corpus = generate(args.count, args.seed)
    figs: dict[str, Figure] = {}
    load = os.getloadavg()
    if "b" in parts:
        figs |= part_b(corpus, args.rounds)
    if "c" in parts:
        figs |= part_c(corpus, args.rounds)
    acks: list[bytes] = []
    if parts & {"d", "e", "f"}:
        e_figs, acks = part_e(corpus, args.rounds)
        if "e" in parts:
            figs |= e_figs
    if "d" in parts:
        with tempfile.TemporaryDirectory(prefix="floor-") as tmp:
            figs |= part_d(corpus, acks, args.rounds, Path(tmp))
    if "a" in parts:
        figs |= part_a(corpus, args.rounds, args.connections)
    if "f" in parts:
        figs |= part_f(acks, args.rounds)
    load = (load, os.getloadavg())
    result = {k: f.med() for k, f in figs.items()}
    floor = summarise(result, args.connections)
    if args.json:
        print(json.dumps({"figures": result, "floor": floor, "load": load}))
        return
    size = sum(len(r) for _, r in corpus)
    print(f"{args.count} messages ({size / 1e6:.1f} MB, seed {args.seed}), {args.rounds} rounds, "
          f"load average {load[0][0]:.2f} -> {load[1][0]:.2f}; CPU ms a message, median "
          f"(min-max), user / sys; wall ms a message")
    for k, v in result.items():
        print(f"  {k:<62} {v['ms']:7.3f} ({v['min']:.3f}-{v['max']:.3f})  "
              f"{v['user']:.3f} / {v['sys']:.3f}  wall {v['wall']:.3f}")
    if floor:
        print("floor (the cheapest variant of each mandated part):")
        for k, v in floor.items():
            print(f"  {k:<100} {v:8.3f}")


def summarise(r: dict[str, dict], conns: int) -> dict:
    """The floor: the cheapest measured variant of each mandated part, summed, and the rate
    it allows on two cores (2000 ms of CPU a second). SMTP receive: the server's CPU with a
    lock-step client (a forced pipelined client is not what an MTA sends the gateway today);
    durable insert: two transactions (the raw message must be durable before the 250)."""
    def least(prefix: str, suffix: str = "", skip: str = "\0") -> tuple[str, float] | None:
        cands = [(k, v["ms"]) for k, v in r.items()
                 if k.startswith(prefix) and k.endswith(suffix) and skip not in k]
        return min(cands, key=lambda kv: kv[1]) if cands else None

    gateway = {
        "a SMTP receive (server)": least("a ", " server", skip="pipelined"),
        "b parse + walk + decode": least("b parse compat32 + "),
        "c bleach": least("c bleach"),
        "d durable writes: intake, processing, sent": least("d SQLite Core, intake + processing with"),
        "e render": least("e Jinja2"),
        "e serialize": least("e ", skip="Jinja2"),
        "f send the ack (client)": least("f smtplib x1 -> aiosmtpd sink client"),
    }
    out: dict = {}
    total = 0.0
    for k, v in gateway.items():
        if v is None:
            continue
        out[f"{k}: {v[0]}"] = v[1]
        total += v[1]
    if not out:
        return {}
    out["gateway floor, ms a message"] = total
    out["allows on 2 cores, msg/s (2000 / floor)"] = 2000 / total
    for name, client, sink in (
            ("smtplib + aiosmtpd sink", least("a ", f"<- smtplib x{conns} client"),
             least("f smtplib x1 -> aiosmtpd sink server")),
            ("lean client + lean sink", least("a ", f"<- lean x{conns} client"),
             least("f smtplib x1 -> lean sink (thread) server"))):
        if client and sink:
            gen = client[1] + sink[1]
            out[f"load generator, {name}, ms a message"] = gen
            out[f"gateway + load generator ({name}): msg/s on 2 cores"] = 2000 / (total + gen)
    return out


def _pick(r: dict[str, dict], prefix: str, suffix: str) -> tuple[str, float] | None:
    cands = [(k, v["ms"]) for k, v in r.items() if k.startswith(prefix) and k.endswith(suffix)]
    return min(cands, key=lambda kv: kv[1]) if cands else None


def _sum2(a, b):  # type: ignore[no-untyped-def]
    if a is None or b is None:
        return None
    return (f"{a[0]} + {b[0]}", a[1] + b[1])


if __name__ == "__main__":
    main()
