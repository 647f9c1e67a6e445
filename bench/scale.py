"""Does ingest keep its rate as the store grows? 1k, 100k and 1M tickets, SQLite and PostgreSQL.

The store is bulk-loaded (not through SMTP: with the database's own bulk paths, SQLite
``executemany`` and PostgreSQL ``COPY``) with N tickets, each with the customer's message and
our acknowledgement as articles and a processed inbound row. At each size the same mixed
mail is ingested by the worker in this process (queued, then drained; 40 % are replies to
random pre-loaded tickets, by ``In-Reply-To`` or by the ticket number in the subject), and
the rate is measured as the median of ``--rounds`` rounds. The store grows in place: 1k,
then 100k, then 1M.

It also prints the query plans of the lookups that run per message (threading by
Message-ID, the ticket number, the sender check, the redelivery check, the root article,
the claim), so a full scan would show.

    .venv/bin/python bench/scale.py --sizes 1000,100000,1000000
    .venv/bin/python bench/scale.py --store postgresql+psycopg://postgres@127.0.0.1/test
"""

from __future__ import annotations

import argparse
import hashlib
import random
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
INBOUND_COLS = ("id", "received_at", "source", "rcpt_tos", "size", "sha256", "raw", "state",
                "attempts", "processed_at", "ticket_id", "article_id")


def customer(i: int) -> str:
    return f"old{i % 50_000}@customer.test"


def rows(cfg, start: int, stop: int, abase: int, ibase: int):  # type: ignore[no-untyped-def]
    """Tickets, articles and inbound rows for ticket ids start..stop-1; article and inbound
    ids follow the largest ones already in the store (the worker adds rows between loads)."""
    from mailgw.numbers import format_number

    tickets, articles, inbound = [], [], []
    for i in range(start, stop):
        a1, a2, ib = abase + 2 * (i - start) + 1, abase + 2 * (i - start) + 2, ibase + i - start + 1
        at = T0 + timedelta(seconds=i)
        number = format_number(cfg, i, at)
        state = "closed" if i % 3 == 0 else "open"
        tickets.append((i, number, f"old request {i}", "support", state, 3, customer(i), at, at,
                        "[]", "{}"))
        articles.append((a1, i, ib, "in", "customer", customer(i), "", "support@example.com",
                         "", f"old request {i}", f"old.{i}@customer.test", None, None,
                         "Please help with request " + str(i), "new_ticket", "bulk", False, at))
        articles.append((a2, i, None, "out", "system", "support@example.com", "Support",
                         customer(i), "", f"[Ticket#{number}] Re: old request {i}",
                         f"mailgw.{i}.bulk@mailgw.localdomain", f"old.{i}@customer.test",
                         f"old.{i}@customer.test", "Thank you", "auto_response",
                         "acknowledgement", True, at))
        inbound.append((ib, at, "smtp", '["support@example.com"]', 100,
                        hashlib.sha256(b"old%d" % i).hexdigest(), b"x", "done", 1, at, i, a1))
    return tickets, articles, inbound


def bulk_load(engine, cfg, count: int) -> range:  # type: ignore[no-untyped-def]
    """Add ``count`` tickets; returns their ids."""
    from sqlalchemy import text

    with engine.connect() as c:
        tmax, amax, imax = (c.scalar(text(f"SELECT coalesce(max(id), 0) FROM {t}"))
                            for t in ("tickets", "articles", "inbound"))
    start, stop = tmax + 1, tmax + 1 + count
    chunk = 50_000
    for lo in range(start, stop, chunk):
        done = lo - start
        t, a, ib = rows(cfg, lo, min(stop, lo + chunk), amax + 2 * done, imax + done)
        if engine.dialect.name == "sqlite":
            _load_sqlite(engine, t, a, ib)
        else:
            _load_pg(engine, t, a, ib)
    if engine.dialect.name == "postgresql":
        raw = engine.raw_connection()
        try:
            with raw.cursor() as cur:
                for table in ("tickets", "articles", "inbound"):
                    cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                f"(SELECT max(id) FROM {table}))")
            raw.commit()
            # Vacuumed and checkpointed now, so neither autovacuum (which a bulk insert
            # triggers) nor a checkpoint of the load's WAL runs while we measure.
            raw.driver_connection.autocommit = True
            with raw.cursor() as cur:
                for table in ("tickets", "articles", "inbound"):
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


def _load_sqlite(engine, t, a, ib) -> None:  # type: ignore[no-untyped-def]
    def fix(r):  # type: ignore[no-untyped-def]
        return tuple(v.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(v, datetime) else v
                     for v in r)

    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute("BEGIN")
        for table, cols, data in (("tickets", TICKET_COLS, t), ("articles", ARTICLE_COLS, a),
                                  ("inbound", INBOUND_COLS, ib)):
            cur.executemany(f"INSERT INTO {table} ({_q(cols)}) VALUES "
                            f"({', '.join('?' * len(cols))})", [fix(r) for r in data])
        cur.execute("COMMIT")
    finally:
        raw.close()


def _load_pg(engine, t, a, ib) -> None:  # type: ignore[no-untyped-def]
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            for table, cols, data in (("tickets", TICKET_COLS, t), ("articles", ARTICLE_COLS, a),
                                      ("inbound", INBOUND_COLS, ib)):
                with cur.copy(f"COPY {table} ({_q(cols)}) FROM STDIN") as cp:
                    for r in data:
                        cp.write_row(r)
        raw.commit()
    finally:
        raw.close()


def mixed_mail(count: int, seed: int, loaded: list[range], cfg) -> list[bytes]:  # type: ignore[no-untyped-def]
    """60 % new requests (gen_corpus), 40 % replies to random pre-loaded tickets."""
    from mailgw.numbers import format_number

    rnd = random.Random(seed)
    fresh = [raw for _, raw in generate(count, seed, reply_share=0.0,
                                        domain=f"round{seed}.customer.test")]
    out = []
    for i, raw in enumerate(fresh):
        if rnd.random() >= 0.4:
            out.append(raw)
            continue
        k = rnd.choice(loaded[rnd.choices(range(len(loaded)), [len(r) for r in loaded])[0]])
        if rnd.random() < 0.5:
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
    from sqlalchemy import or_, select, text

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
        "redelivery check (process._redelivery_of)":
            select(m.Inbound.id, m.Inbound.rcpt_tos, m.Inbound.queue).where(
                m.Inbound.sha256 == "00" * 32, m.Inbound.id != 1, m.Inbound.state == "done"),
        "root article of a ticket (process._queue_ack)":
            select(m.Article.message_id).where(m.Article.ticket_id == 5,
                                               m.Article.message_id.is_not(None))
            .order_by(m.Article.id).limit(1),
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
            prefix = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN "
            plan = c.execute(text(prefix + sql)).all()
            lines = [r[-1] for r in plan]
            out.append(f"-- {title}\n" + "\n".join(f"   {line}" for line in lines))
    return "\n".join(out)


def _backend_pids(engine) -> set[int]:  # type: ignore[no-untyped-def]
    """PostgreSQL: the server processes serving our connections, to count their CPU too."""
    pids: set[int] = set()
    if engine.dialect.name == "postgresql":
        from sqlalchemy import event

        @event.listens_for(engine, "connect")
        def _pid(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            with dbapi_conn.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                pids.add(cur.fetchone()[0])
            dbapi_conn.commit()
    return pids


def _cpu(pids: set[int]) -> float:
    import psutil

    total = 0.0
    for pid in list(pids):
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pids.discard(pid)
    return total


def _blocks_text(blocks: list[tuple[float, float]]) -> str:
    if not blocks or not any(r or h for r, h in blocks):
        return ""
    read = statistics.median(r for r, _ in blocks)
    hit = statistics.median(h for _, h in blocks)
    return f"blocks per message: {read:.1f} read into shared_buffers, {hit:.1f} found there; "


def _blocks(engine) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """PostgreSQL: (blocks read from outside shared_buffers, blocks found in them) so far,
    heap and indexes of this schema's tables (pg_statio: other databases' load not in it)."""
    if engine.dialect.name != "postgresql":
        return 0, 0
    from sqlalchemy import text

    time.sleep(1.1)  # the server publishes a backend's I/O counters at most once a second
    with engine.connect() as c:
        read, hit = c.execute(text(
            "SELECT sum(coalesce(heap_blks_read, 0) + coalesce(idx_blks_read, 0) "
            "+ coalesce(toast_blks_read, 0) + coalesce(tidx_blks_read, 0)), "
            "sum(coalesce(heap_blks_hit, 0) + coalesce(idx_blks_hit, 0) "
            "+ coalesce(toast_blks_hit, 0) + coalesce(tidx_blks_hit, 0)) "
            "FROM pg_statio_user_tables WHERE schemaname = current_schema()")).one()
    return int(read or 0), int(hit or 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store")
    ap.add_argument("--sizes", default="1000,100000,1000000")
    ap.add_argument("--messages", type=int, default=300, help="messages per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hash-indexes", action="store_true",
                    help="PostgreSQL experiment: the two random-key lookup indexes "
                         "(articles.message_id, inbound.sha256) as hash indexes")
    args = ap.parse_args()

    from sqlalchemy import text

    from mailgw.home import init_home
    from mailgw.outbound.render import Renderer
    from mailgw.process import Context
    from mailgw.queue import put_many
    from mailgw.settings import Home, load_settings
    from mailgw.store.db import make_engine, migrate
    from mailgw.types import Envelope
    from mailgw.worker import Worker

    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "home"
        init_home(path)
        home = Home.resolve(str(path))
        settings = load_settings(home)
        cfg = settings.ticket_numbers
        with bench_store(args.store, path) as url:
            engine = make_engine(url)
            backends = _backend_pids(engine)
            migrate(engine)
            if args.hash_indexes and engine.dialect.name == "postgresql":
                with engine.begin() as c:
                    for table, column in (("articles", "message_id"), ("inbound", "sha256")):
                        c.exec_driver_sql(f"DROP INDEX ix_{table}_{column}")
                        c.exec_driver_sql(f"CREATE INDEX ix_{table}_{column} ON {table} "
                                          f"USING hash ({column})")
            ctx = Context(settings, Renderer(home.templates))
            worker = Worker(engine, lambda: ctx, batch_size=settings.worker.batch_size,
                            max_attempts=settings.worker.max_attempts)
            loaded: list[range] = []
            seed = 100
            for size in sizes:
                t = time.perf_counter()
                loaded.append(bulk_load(engine, cfg, size - sum(len(r) for r in loaded)))
                load_s = time.perf_counter() - t
                rates, cpus, blocks = [], [], []
                with engine.connect() as c:
                    first_inbound = c.scalar(text("SELECT max(id) FROM inbound"))
                # The first round at the first size warms caches (compiled statements,
                # templates) and is not counted.
                for r in range(args.rounds + (1 if size == sizes[0] else 0)):
                    seed += 1
                    mails = mixed_mail(args.messages, seed, loaded, cfg)
                    put_many(engine, [Envelope(raw=r, mail_from="bench@customer.test",
                                               rcpt_tos=("support@example.com",),
                                               source="smtp", received_at=datetime.now(UTC))
                                      for r in mails])
                    b0 = _blocks(engine)
                    t, c0 = time.perf_counter(), time.process_time()
                    d0 = _cpu(backends)
                    while worker.run_batch():
                        pass
                    if size == sizes[0] and r == 0:
                        continue
                    rates.append(len(mails) / (time.perf_counter() - t))
                    # CPU of this process per message: less disturbed by other load on the
                    # machine than the rate (on PostgreSQL the server's CPU is not in it).
                    cpus.append((time.process_time() - c0 + _cpu(backends) - d0)
                                * 1000 / len(mails))
                    b1 = _blocks(engine)
                    blocks.append(((b1[0] - b0[0]) / len(mails), (b1[1] - b0[1]) / len(mails)))
                with engine.connect() as c:
                    threaded = c.execute(text(
                        "SELECT threaded_by, count(*) FROM articles WHERE direction = 'in' "
                        "AND thread_reason <> 'bulk' AND inbound_id > :i GROUP BY threaded_by"),
                        {"i": first_inbound}).all()
                results.append((size, load_s, statistics.median(rates), rates, threaded))
                print(f"{size:>9} tickets (bulk load {load_s:6.1f} s): ingest "
                      f"{statistics.median(rates):6.1f} msg/s (rounds "
                      f"{' '.join(f'{r:.1f}' for r in rates)}), "
                      f"{statistics.median(cpus):.2f} ms CPU/msg (worker + its database "
                      f"server processes: capacity {1000 / statistics.median(cpus):.0f} msg/s "
                      f"per core); {_blocks_text(blocks)}threaded by "
                      f"{dict((k, v) for k, v in threaded)}", flush=True)
            print("\nquery plans at", sizes[-1], "tickets:")
            print(explain(engine))
            engine.dispose()
    base = results[0][2]
    for size, _, rate, _, _ in results[1:]:
        print(f"rate at {size} / rate at {results[0][0]}: {rate / base:.0%}")


if __name__ == "__main__":
    main()
