"""Does ingest keep its rate as the store grows? 1k and 1M tickets, SQLite and PostgreSQL.

Each size gets its own store, bulk-loaded once (not through SMTP: with the database's own
bulk paths, SQLite ``executemany`` and PostgreSQL ``COPY``) with N tickets, each with the
customer's message and our acknowledgement as articles, a processed inbound row, its events
and its sent outbox row. The sizes are then measured in turns (ABBA: 1k, 1M, 1M, 1k, ...),
so load on the machine falls on both alike: each round queues the same mixed mail for both
(40 % replies to random pre-loaded tickets, by ``In-Reply-To`` or by the ticket number in the
subject) and the worker in this process drains it. Per round: the rate, the CPU per message
of this process and of the PostgreSQL backends serving it (from /proc), blocks read and hit;
at the end the 1M / 1k ratios per pair. ``--statements`` (PostgreSQL) prints every statement
the worker ran with its buffers and WAL per message at each size (auto_explain).

    .venv/bin/python bench/scale.py
    .venv/bin/python bench/scale.py --store postgresql+psycopg://postgres@127.0.0.1/test --statements
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gen_corpus import generate  # noqa: E402
from smtp_bench import bench_store  # noqa: E402

T0 = datetime(2025, 1, 1, tzinfo=UTC)
TICKET_COLS = ("id", "number", "title", "queue", "state", "priority", "customer",
               "created_at", "updated_at", "tags", "custom_fields")
ARTICLE_COLS = ("id", "ticket_id", "inbound_id", "direction", "sender_type", "from_addr",
                "from_name", "to_addrs", "cc_addrs", "subject", "message_id", "in_reply_to",
                "references", "body_text", "threaded_by", "thread_reason", "is_automatic",
                "created_at")
INBOUND_COLS = ("id", "received_at", "source", "rcpt_tos", "size", "sha256", "state",
                "attempts", "processed_at", "ticket_id", "article_id", "message_id")
INBOUND_RAW_COLS = ("inbound_id", "raw")  # the raw mail's own table (decision 35)
EVENT_COLS = ("id", "ticket_id", "article_id", "inbound_id", "type", "data", "created_at")
OUTBOX_COLS = ("id", "ticket_id", "article_id", "mail_from", "rcpt_tos", "message_id", "raw",
               "state", "attempts", "next_attempt_at", "created_at", "sent_at")
TABLES = ("tickets", "articles", "inbound", "events", "outbox")


def customer(i: int) -> str:
    return f"old{i % 50_000}@customer.test"


def rows(cfg, start: int, stop: int, base: dict[str, int]):  # type: ignore[no-untyped-def]
    """Rows for ticket ids start..stop-1: the ticket, the customer's message and our
    acknowledgement as articles, the processed inbound row, the three events the worker
    writes for a new ticket and the acknowledgement's (sent) outbox row. Ids of the other
    tables follow ``base`` (the largest ones already in the store)."""
    from mailgw.numbers import format_number

    tickets, articles, inbound, inbound_raw, events, outbox = [], [], [], [], [], []
    for i in range(start, stop):
        n = i - start
        a1, a2 = base["articles"] + 2 * n + 1, base["articles"] + 2 * n + 2
        ib, ob, ev = base["inbound"] + n + 1, base["outbox"] + n + 1, base["events"] + 3 * n
        at = T0 + timedelta(seconds=i)
        number = format_number(cfg, i, at)
        state = "closed" if i % 3 == 0 else "open"
        ours = f"mailgw.{i}.bulk@mailgw.localdomain"
        tickets.append((i, number, f"old request {i}", "support", state, 3, customer(i), at, at,
                        "[]", "{}"))
        articles.append((a1, i, ib, "in", "customer", customer(i), "", "support@example.com",
                         "", f"old request {i}", f"old.{i}@customer.test", None, None,
                         "Please help with request " + str(i), "new_ticket", "bulk", False, at))
        articles.append((a2, i, None, "out", "system", "support@example.com", "Support",
                         customer(i), "", f"[Ticket#{number}] Re: old request {i}",
                         ours, f"old.{i}@customer.test",
                         f"old.{i}@customer.test", "Thank you", "auto_response",
                         "acknowledgement", True, at))
        inbound.append((ib, at, "smtp", '["support@example.com"]', 100,
                        hashlib.sha256(b"old%d" % i).hexdigest(), "done", 1, at, i, a1,
                        f"old.{i}@customer.test"))
        inbound_raw.append((ib, b"x"))
        events.append((ev + 1, i, None, ib, "ticket_created", '{"queue": "support"}', at))
        events.append((ev + 2, i, a1, ib, "article_received", '{"source": "smtp"}', at))
        events.append((ev + 3, i, a2, ib, "auto_response_queued", '{"template": "ack_new"}', at))
        outbox.append((ob, i, a2, "support@example.com", f'["{customer(i)}"]', ours,
                       b"Subject: Thank you\r\n\r\nThank you\r\n", "sent", 1, at, at, at))
    return {"tickets": (TICKET_COLS, tickets), "articles": (ARTICLE_COLS, articles),
            "inbound": (INBOUND_COLS, inbound), "inbound_raw": (INBOUND_RAW_COLS, inbound_raw),
            "events": (EVENT_COLS, events),
            "outbox": (OUTBOX_COLS, outbox)}


def bulk_load(engine, cfg, count: int) -> range:  # type: ignore[no-untyped-def]
    """Add ``count`` tickets; returns their ids."""
    from sqlalchemy import text

    with engine.connect() as c:
        base = {t: c.scalar(text(f"SELECT coalesce(max(id), 0) FROM {t}")) for t in TABLES}
    start, stop = base["tickets"] + 1, base["tickets"] + 1 + count
    chunk = 50_000
    for lo in range(start, stop, chunk):
        done = lo - start
        data = rows(cfg, lo, min(stop, lo + chunk),
                    {"articles": base["articles"] + 2 * done, "inbound": base["inbound"] + done,
                     "events": base["events"] + 3 * done, "outbox": base["outbox"] + done})
        if engine.dialect.name == "sqlite":
            _load_sqlite(engine, data)
        else:
            _load_pg(engine, data)
    if engine.dialect.name == "postgresql":
        raw = engine.raw_connection()
        try:
            with raw.cursor() as cur:
                for table in TABLES:
                    cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                f"(SELECT max(id) FROM {table}))")
            raw.commit()
            # Vacuumed and checkpointed now, so neither autovacuum (which a bulk insert
            # triggers) nor a checkpoint of the load's WAL runs while we measure.
            raw.driver_connection.autocommit = True
            with raw.cursor() as cur:
                for table in (*TABLES, "inbound_raw"):
                    cur.execute(f"VACUUM (ANALYZE) {table}")
                cur.execute("CHECKPOINT")
            raw.driver_connection.autocommit = False
        finally:
            raw.close()
    else:
        with engine.begin() as c:
            c.exec_driver_sql("ANALYZE")
        raw = engine.raw_connection()  # outside a transaction: the checkpoint needs that
        try:
            raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            raw.close()
    return range(start, stop)


def _q(cols) -> str:  # type: ignore[no-untyped-def]
    return ", ".join(f'"{c}"' for c in cols)


def _load_sqlite(engine, data) -> None:  # type: ignore[no-untyped-def]
    def fix(r):  # type: ignore[no-untyped-def]
        return tuple(v.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(v, datetime) else v
                     for v in r)

    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute("BEGIN")
        for table, (cols, rs) in data.items():
            cur.executemany(f"INSERT INTO {table} ({_q(cols)}) VALUES "
                            f"({', '.join('?' * len(cols))})", [fix(r) for r in rs])
        cur.execute("COMMIT")
    finally:
        raw.close()


def _load_pg(engine, data) -> None:  # type: ignore[no-untyped-def]
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            for table, (cols, rs) in data.items():
                with cur.copy(f"COPY {table} ({_q(cols)}) FROM STDIN") as cp:
                    for r in rs:
                        cp.write_row(r)
        raw.commit()
    finally:
        raw.close()


def mixed_mail(count: int, seed: int, loaded: list[range], cfg) -> list[bytes]:  # type: ignore[no-untyped-def]
    """60 % new requests (gen_corpus), 40 % replies to random pre-loaded tickets. The same
    ``seed`` gives the same new mails and the same replies at the same positions for any
    store: only which pre-loaded ticket a reply goes to depends on the store's size."""
    from mailgw.numbers import format_number

    rnd = random.Random(seed)
    targets = random.Random(seed * 7919 + 1)
    fresh = [raw for _, raw in generate(count, seed, reply_share=0.0,
                                        domain=f"round{seed}.customer.test")]
    out = []
    for i, raw in enumerate(fresh):
        if rnd.random() >= 0.4:
            out.append(raw)
            continue
        by_number = rnd.random() >= 0.5
        k = targets.choice(loaded[targets.choices(range(len(loaded)),
                                                  [len(r) for r in loaded])[0]])
        if not by_number:
            head = (f"From: {customer(k)}\r\nTo: support@example.com\r\n"
                    f"Subject: Re: old request {k}\r\nMessage-ID: <r{seed}.{i}@customer.test>\r\n"
                    f"In-Reply-To: <mailgw.{k}.bulk@mailgw.localdomain>\r\n")
        else:
            number = format_number(cfg, k, T0 + timedelta(seconds=k))
            head = (f"From: {customer(k)}\r\nTo: support@example.com\r\n"
                    f"Subject: Re: [Ticket#{number}] old request {k}\r\n"
                    f"Message-ID: <r{seed}.{i}@customer.test>\r\n")
        out.append(head.encode() + b"\r\nThanks, one more question about it.\r\n")
    return out


def explain(engine) -> str:  # type: ignore[no-untyped-def]
    """Plans of the per-message lookups, as the code issues them."""
    from sqlalchemy import func, or_, select, text

    from mailgw.store import models as m

    stamp = datetime.now(UTC)
    queries = {
        "threading: Message-IDs in In-Reply-To/References (threader.find_ticket)":
            select(m.Article.message_id, m.Article.ticket_id)
            .where(m.Article.message_id.in_(["old.5@customer.test", "x@y"]))
            .order_by(m.Article.id.desc()),
        "ticket number from the subject (threader.find_ticket)":
            select(m.Ticket).where(m.Ticket.number == "2025010110000005"),
        "sender on the ticket (threader._sender_on_ticket)":
            select(m.Article.id).where(m.Article.ticket_id == 5,
                                       m.Article.from_addr == "old5@customer.test",
                                       m.Article.direction == "in").limit(1),
        "redelivery check of a batch (worker._Redeliveries)":
            select(m.Inbound.id, m.Inbound.sha256, m.Inbound.rcpt_tos, m.Inbound.queue).where(
                m.Inbound.sha256.in_(["00" * 32, "11" * 32]), m.Inbound.state == "done")
            .order_by(m.Inbound.id),
        "root article of a ticket (process._queue_ack)":
            select(m.Article.message_id).where(m.Article.ticket_id == 5,
                                               m.Article.message_id.is_not(None))
            .order_by(m.Article.id).limit(1),
        "loop protection, per address (loops.limit_reason)":
            select(func.count()).select_from(m.AutoReply).where(
                m.AutoReply.recipient == "old5@customer.test", m.AutoReply.created_at >= stamp),
        "loop protection, per ticket (loops.limit_reason)":
            select(func.count()).select_from(m.AutoReply).where(
                m.AutoReply.ticket_id == 5, m.AutoReply.created_at >= stamp),
        "originals still in the queue (threader.prefetch, decision 31)":
            select(m.Inbound.id, m.Inbound.message_id, m.Inbound.state).where(
                m.Inbound.message_id.in_(["old.5@customer.test", "x@y"])),
        "claim a batch (worker._claim)":
            select(m.Inbound.id, m.Inbound.attempts).where(
                m.Inbound.state == "pending",
                or_(m.Inbound.claimed_until.is_(None), m.Inbound.claimed_until < stamp))
            .order_by(m.Inbound.id).limit(64),
    }
    sqlite = engine.dialect.name == "sqlite"
    out = []
    with engine.connect() as c:
        for title, q in queries.items():
            sql = str(q.compile(engine, compile_kwargs={"literal_binds": True}))
            prefix = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN (COSTS OFF) "
            plan = c.execute(text(prefix + sql)).all()
            lines = [r[-1] for r in plan]
            out.append(f"-- {title}\n" + "\n".join(f"   {line}" for line in lines))
    return "\n".join(out)


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process, from /proc (the PostgreSQL backends run as
    another user; their stat file is readable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


class Store:
    """One store at one size, with its own engine, worker and (PostgreSQL) schema."""

    def __init__(self, url: str, ctx, settings, label: str):  # type: ignore[no-untyped-def]
        from mailgw.store.db import make_engine, migrate
        from mailgw.worker import Worker

        self.url, self.label, self.ctx, self.settings = url, label, ctx, settings
        self.engine = make_engine(url)
        self.pg = self.engine.dialect.name == "postgresql"
        self.backends: set[int] = set()
        if self.pg:
            from sqlalchemy import event

            @event.listens_for(self.engine, "connect")
            def _pid(dbapi_conn, _record):  # type: ignore[no-untyped-def]
                with dbapi_conn.cursor() as cur:
                    cur.execute("SELECT pg_backend_pid()")
                    self.backends.add(cur.fetchone()[0])
                dbapi_conn.commit()
        migrate(self.engine)
        self.worker = Worker(self.engine, lambda: ctx, batch_size=settings.worker.batch_size,
                             max_attempts=settings.worker.max_attempts)
        self.loaded: list[range] = []

    def load(self, size: int) -> float:
        t = time.perf_counter()
        self.loaded.append(bulk_load(self.engine, self.settings.ticket_numbers,
                                     size - sum(len(r) for r in self.loaded)))
        return time.perf_counter() - t

    def db_cpu(self) -> float:
        total = 0.0
        for pid in list(self.backends):
            cpu = _proc_cpu(pid)
            if cpu is None:
                self.backends.discard(pid)
            else:
                total += cpu
        return total

    def blocks(self) -> tuple[int, int]:
        """PostgreSQL: (blocks read into shared_buffers, blocks found there) so far, heap and
        indexes of this schema's tables (pg_statio: other databases' load is not in it)."""
        if not self.pg:
            return 0, 0
        from sqlalchemy import text

        # A backend publishes its I/O counters at most once a second, or when told to.
        time.sleep(1.05)
        with self.engine.connect() as c:
            c.execute(text("SELECT pg_stat_force_next_flush()"))
            c.commit()
            read, hit = c.execute(text(
                "SELECT sum(coalesce(heap_blks_read, 0) + coalesce(idx_blks_read, 0) "
                "+ coalesce(toast_blks_read, 0) + coalesce(tidx_blks_read, 0)), "
                "sum(coalesce(heap_blks_hit, 0) + coalesce(idx_blks_hit, 0) "
                "+ coalesce(toast_blks_hit, 0) + coalesce(tidx_blks_hit, 0)) "
                "FROM pg_statio_user_tables WHERE schemaname = current_schema()")).one()
        return int(read or 0), int(hit or 0)

    def round(self, mails: list[bytes], worker=None) -> dict[str, float]:  # type: ignore[no-untyped-def]
        from mailgw.queue import put_many
        from mailgw.types import Envelope

        worker = worker or self.worker
        envelopes = [Envelope(raw=r, mail_from="bench@customer.test",
                              rcpt_tos=("support@example.com",), source="smtp",
                              received_at=datetime.now(UTC)) for r in mails]
        # Intake (the inbound rows, as SMTP intake writes them), in batches of 25 as a busy
        # listener commits them; timed apart from the worker.
        t, c0, d0 = time.perf_counter(), time.process_time(), self.db_cpu()
        for i in range(0, len(envelopes), 25):
            put_many(self.engine, envelopes[i:i + 25])
        intake_wall, intake_cpu = (time.perf_counter() - t,
                                   time.process_time() - c0 + self.db_cpu() - d0)
        b0 = self.blocks()
        t, c0, d0 = time.perf_counter(), time.process_time(), self.db_cpu()
        while worker.run_batch():
            pass
        wall, proc, db = (time.perf_counter() - t, time.process_time() - c0,
                          self.db_cpu() - d0)
        b1 = self.blocks()
        n = len(mails)
        return {"rate": n / wall, "cpu": (proc + db) * 1000 / n, "cpu_worker": proc * 1000 / n,
                "cpu_db": db * 1000 / n, "read": (b1[0] - b0[0]) / n, "hit": (b1[1] - b0[1]) / n,
                "intake_cpu": intake_cpu * 1000 / n, "rate_all": n / (wall + intake_wall),
                "cpu_all": (proc + db + intake_cpu) * 1000 / n}

    def hot_updates(self) -> str:
        """PostgreSQL: updates of each table so far, and how many were HOT (heap-only: the
        same page, no index entries)."""
        if not self.pg:
            return ""
        from sqlalchemy import text

        with self.engine.connect() as c:
            c.execute(text("SELECT pg_stat_force_next_flush()"))
            c.commit()
            rows = c.execute(text(
                "SELECT relname, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                "WHERE schemaname = current_schema() AND n_tup_upd > 0 ORDER BY relname")).all()
        return ", ".join(f"{r} {h}/{u} HOT" for r, u, h in rows)

    def threaded(self, since_inbound: int) -> dict[str, int]:
        from sqlalchemy import text

        with self.engine.connect() as c:
            return dict(c.execute(text(
                "SELECT threaded_by, count(*) FROM articles WHERE direction = 'in' "
                "AND thread_reason <> 'bulk' AND inbound_id > :i GROUP BY threaded_by"),
                {"i": since_inbound}).all())

    def max_inbound(self) -> int:
        from sqlalchemy import text

        with self.engine.connect() as c:
            return c.scalar(text("SELECT coalesce(max(id), 0) FROM inbound"))

    def tickets(self) -> int:
        from sqlalchemy import text

        with self.engine.connect() as c:
            return c.scalar(text("SELECT count(*) FROM tickets"))

    def statements(self, mails: list[bytes]) -> dict[str, dict[str, float]]:
        """PostgreSQL: one round with ``auto_explain`` loaded in the worker's sessions
        (superuser ``LOAD``, session settings only; the plans come back as notices): every
        statement the worker runs, grouped by its text, with its buffers and WAL. Not timed
        (the instrumentation costs)."""
        from sqlalchemy import event

        from mailgw.store.db import make_engine
        from mailgw.worker import Worker

        engine = make_engine(self.url)
        plans: list[str] = []

        @event.listens_for(engine, "connect")
        def _explain(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.add_notice_handler(lambda d: plans.append(d.message_primary or ""))
            with dbapi_conn.cursor() as cur:
                cur.execute("LOAD 'auto_explain'")
                for name, value in (("log_min_duration", "0"), ("log_analyze", "on"),
                                    ("log_buffers", "on"), ("log_wal", "on"),
                                    ("log_timing", "off"), ("log_nested_statements", "on"),
                                    ("log_format", "json"), ("log_level", "notice")):
                    cur.execute(f"SET auto_explain.{name} = {value}")
            dbapi_conn.commit()

        worker = Worker(engine, lambda: self.ctx, batch_size=self.settings.worker.batch_size,
                        max_attempts=self.settings.worker.max_attempts)
        plans.clear()
        self.round(mails, worker)
        engine.dispose()
        keys = {"hit": "Shared Hit Blocks", "read": "Shared Read Blocks",
                "dirtied": "Shared Dirtied Blocks", "written": "Shared Written Blocks",
                "wal_fpi": "WAL FPI", "wal_bytes": "WAL Bytes"}
        out: dict[str, dict[str, float]] = {}
        for note in plans:
            head, sep, body = note.partition("plan:")
            if not sep:
                continue
            try:
                doc = json.loads(body)
            except ValueError:
                continue
            query = _normalise(doc.get("Query Text", ""))
            if "pg_statio_user_tables" in query or "pg_stat_force_next_flush" in query:
                continue
            acc = out.setdefault(query, dict.fromkeys(["calls", "ms", *keys], 0.0))
            acc["calls"] += 1
            acc["ms"] += float(head.split()[1]) if head.startswith("duration:") else 0.0
            for k, name in keys.items():
                acc[k] += doc["Plan"].get(name, 0)
        return {q: {k: v / len(mails) for k, v in acc.items()} for q, acc in out.items()}


def _normalise(sql: str) -> str:
    sql = re.sub(r"\s+", " ", sql).strip()
    sql = re.sub(r"\$\d+", "?", sql)
    sql = re.sub(r'"bench_[0-9a-f]+"\.', "", sql)
    sql = re.sub(r"\?(::[A-Z ]+)?(, \?(::[A-Z ]+)?)+", "?…", sql)
    sql = re.sub(r"'[^']*'", "'…'", sql)
    return sql


def _statements_table(small: dict, large: dict, labels: tuple[str, str]) -> str:  # type: ignore[type-arg]
    cols = ("calls", "hit", "read", "dirtied", "written", "wal_fpi", "wal_bytes", "ms")
    zero = dict.fromkeys(cols, 0.0)
    lines = [f"per message, {labels[0]} -> {labels[1]}: " + ", ".join(cols)]
    growth = sorted(set(small) | set(large), key=lambda q: -(
        sum(large.get(q, zero)[k] - small.get(q, zero)[k] for k in ("read", "dirtied", "wal_fpi"))))
    for q in growth:
        a, b = small.get(q, zero), large.get(q, zero)
        if max(a["calls"], b["calls"]) < 0.005:
            continue
        lines.append(f"  {q[:150]}")
        lines.append("      " + "  ".join(f"{k} {a[k]:.2f}->{b[k]:.2f}" if k != "wal_bytes" else
                                          f"wal_kB {a[k] / 1024:.1f}->{b[k] / 1024:.1f}"
                                          for k in cols))
    tot = {side: {k: sum(v[k] for v in d.values()) for k in cols}
           for side, d in (("a", small), ("b", large))}
    lines.append("  TOTAL  " + "  ".join(
        f"{k} {tot['a'][k]:.2f}->{tot['b'][k]:.2f}" if k != "wal_bytes" else
        f"wal_kB {tot['a'][k] / 1024:.1f}->{tot['b'][k] / 1024:.1f}" for k in cols))
    return "\n".join(lines)


def _fmt(values: list[float], digits: int = 1) -> str:
    return (f"{statistics.median(values):.{digits}f} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store")
    ap.add_argument("--sizes", default="1000,1000000",
                    help="store sizes in tickets, each in its own store (default 1000,1000000); "
                         "PostgreSQL: SIZE:ffN loads that store with tickets at fillfactor N "
                         "(1000000:ff100 is the store before migration 0010), to compare the "
                         "two in the same run")
    ap.add_argument("--messages", type=int, default=300, help="messages per round")
    ap.add_argument("--pairs", type=int, default=8,
                    help="rounds per size, the sizes taking turns (ABBA order)")
    ap.add_argument("--statements", action="store_true",
                    help="PostgreSQL: one more round per size with auto_explain, every statement "
                         "with its buffers and WAL per message")
    ap.add_argument("--hash-indexes", action="store_true",
                    help="PostgreSQL experiment: the two random-key lookup indexes "
                         "(articles.message_id, inbound.sha256) as hash indexes")
    args = ap.parse_args()

    from mailgw.home import init_home
    from mailgw.outbound.render import Renderer
    from mailgw.process import Context
    from mailgw.settings import Home, load_settings

    sizes = [(int(s.partition(":")[0]), s.partition(":")[2]) for s in args.sizes.split(",")]
    print(f"start {datetime.now(UTC):%H:%M:%S} UTC, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        path = Path(tmp) / "home"
        init_home(path)
        home = Home.resolve(str(path))
        settings = load_settings(home)
        ctx = Context(settings, Renderer(home.templates))
        stores: list[Store] = []
        for n, (size, variant) in enumerate(sizes):
            where = Path(tmp) / f"store{n}"
            url = stack.enter_context(bench_store(args.store, where))
            store = Store(url, ctx, settings, f"{size:,}" + (f" {variant}" if variant else ""))
            stack.callback(store.engine.dispose)
            if variant.startswith("ff") and store.pg:
                with store.engine.begin() as c:
                    c.exec_driver_sql(f"ALTER TABLE tickets SET (fillfactor = {int(variant[2:])})")
            if args.hash_indexes and store.pg:
                with store.engine.begin() as c:
                    for table, column in (("articles", "message_id"), ("inbound", "sha256")):
                        c.exec_driver_sql(f"DROP INDEX ix_{table}_{column}")
                        c.exec_driver_sql(f"CREATE INDEX ix_{table}_{column} ON {table} "
                                          f"USING hash ({column})")
            load_s = store.load(size)
            print(f"{store.label:>9} tickets loaded in {load_s:.1f} s", flush=True)
            stores.append(store)
        seed = 100
        # A first round on each store warms what is warmed once (compiled statements,
        # templates, the store's hot pages); not counted.
        seed += 1
        for store in stores:
            store.round(mixed_mail(args.messages, seed, store.loaded, settings.ticket_numbers))
        first = {id(s): s.max_inbound() for s in stores}
        results: dict[int, list[dict[str, float]]] = {id(s): [] for s in stores}
        for pair in range(args.pairs):
            seed += 1
            # ABBA: each size goes first as often as last, so drift and any order effect
            # fall on both sizes alike.
            order = stores if pair % 2 == 0 else stores[::-1]
            for store in order:
                r = store.round(mixed_mail(args.messages, seed, store.loaded,
                                           settings.ticket_numbers))
                results[id(store)].append(r)
                print(f"  pair {pair + 1:>2} {store.label:>9}: {r['rate']:6.1f} msg/s, "
                      f"{r['cpu']:5.2f} ms CPU/msg (worker {r['cpu_worker']:.2f}, database "
                      f"{r['cpu_db']:.2f}), blocks read {r['read']:.1f} hit {r['hit']:.0f}; "
                      f"intake {r['intake_cpu']:.2f} ms CPU/msg, with intake {r['rate_all']:.1f} "
                      f"msg/s; "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
        print(f"\nend {datetime.now(UTC):%H:%M:%S} UTC, load average "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print("size: worker msg/s | CPU ms/msg (worker + database) | worker | database | "
              "blocks read/msg | hit/msg | intake CPU ms/msg | intake + worker msg/s | "
              "intake + worker CPU ms/msg   (median (min-max) of the rounds)")
        for store in stores:
            rs = results[id(store)]
            print(f"{store.label:>9}: {_fmt([r['rate'] for r in rs])} | "
                  f"{_fmt([r['cpu'] for r in rs], 2)} | {_fmt([r['cpu_worker'] for r in rs], 2)} "
                  f"| {_fmt([r['cpu_db'] for r in rs], 2)} | {_fmt([r['read'] for r in rs])} | "
                  f"{_fmt([r['hit'] for r in rs], 0)} | {_fmt([r['intake_cpu'] for r in rs], 2)} | "
                  f"{_fmt([r['rate_all'] for r in rs])} | {_fmt([r['cpu_all'] for r in rs], 2)}; threaded "
                  f"{store.threaded(first[id(store)])}; {store.tickets():,} tickets at the end")
            if store.pg:
                print(f"{'':>11}updates: {store.hot_updates()}")
        base = results[id(stores[0])]
        for store in stores[1:]:
            rs = results[id(store)]
            rate = [b["rate"] / a["rate"] * 100 for a, b in zip(base, rs, strict=True)]
            cap = [a["cpu"] / b["cpu"] * 100 for a, b in zip(base, rs, strict=True)]
            rate_all = [b["rate_all"] / a["rate_all"] * 100 for a, b in zip(base, rs, strict=True)]
            cap_all = [a["cpu_all"] / b["cpu_all"] * 100 for a, b in zip(base, rs, strict=True)]
            print(f"{store.label} vs {stores[0].label}, per pair: rate {_fmt(rate, 0)} %, "
                  f"CPU capacity (1/CPU per message) {_fmt(cap, 0)} %; ratio of the medians: "
                  f"rate {statistics.median(r['rate'] for r in rs) / statistics.median(r['rate'] for r in base):.0%}, "
                  f"CPU capacity {statistics.median(r['cpu'] for r in base) / statistics.median(r['cpu'] for r in rs):.0%}")
            print(f"{store.label} vs {stores[0].label}, intake + worker, per pair: rate "
                  f"{_fmt(rate_all, 0)} %, CPU capacity {_fmt(cap_all, 0)} %")
        if args.statements and stores[0].pg:
            seed += 1
            stats = [s.statements(mixed_mail(args.messages, seed, s.loaded,
                                             settings.ticket_numbers)) for s in stores]
            for store, stat in zip(stores[1:], stats[1:], strict=True):
                print()
                print(_statements_table(stats[0], stat, (stores[0].label, store.label)))
        print(f"\nquery plans at {stores[-1].label} tickets:")
        print(explain(stores[-1].engine))


if __name__ == "__main__":
    main()
