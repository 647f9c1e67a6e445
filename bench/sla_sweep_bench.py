"""The SLA escalation sweep over a large store: how long one tick takes, SQLite and PostgreSQL.

Bulk-loads ``--tickets`` open tickets (SQLite ``executemany``, PostgreSQL ``COPY``), each with
its customer article and a first-response SLA clock: most clocks run with their next notice
due in the coming days, some are stopped (no notice pending), and ``--due`` of them have a
level due now. Then it measures, over ``--rounds`` rounds (median, min, max):

- an idle tick: the sweep when nothing is due (what runs every ``sla_sweep.interval`` seconds
  almost always): one indexed query;
- a busy tick: the sweep with ``--due`` clocks due: each fires its notice (the guard row,
  the rendered mail in the outbox with its article, the event, the next level scheduled).
  The due clocks are reset between rounds, outside the timing.

and prints the query plan of the claim (it must use the partial index
``ix_sla_clocks_next_notice_at``, not scan the clocks).

    .venv/bin/python bench/sla_sweep_bench.py                        # SQLite, 100,000 tickets
    .venv/bin/python bench/sla_sweep_bench.py --tickets 1000000      # the issue's size
    .venv/bin/python bench/sla_sweep_bench.py --store postgresql+psycopg://postgres@127.0.0.1/test

A PostgreSQL store gets a fresh schema, dropped afterwards (``--keep`` keeps it).

Loading 1,000,000 tickets takes minutes. To load once and measure many times (e.g. two
versions of the code, alternating), name the store: ``--db FILE`` (SQLite) or ``--schema
NAME`` (PostgreSQL). A named store is kept; when it already holds the tickets it is not
loaded again, and the sweep runs at the instant it was loaded for (the due clocks' start +
200 minutes), so the clocks that were not due then are still not due.

    .venv/bin/python bench/sla_sweep_bench.py --tickets 1000000 --db /tmp/sla-1m.db
    .venv/bin/python bench/sla_sweep_bench.py --tickets 1000000 --schema sla_1m \
        --store postgresql+psycopg://postgres@127.0.0.1/test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bulk import write_rows  # noqa: E402 - bench/ is the script's directory

T0 = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
TICKET_COLS = ("id", "number", "title", "queue", "state", "priority", "customer", "owner",
               "created_at", "updated_at", "tags", "custom_fields", "sla")
ARTICLE_COLS = ("id", "ticket_id", "direction", "sender_type", "from_addr", "from_name",
                "to_addrs", "cc_addrs", "subject", "body_text", "message_id", "threaded_by",
                "thread_reason", "is_automatic", "created_at")
CLOCK_COLS = ("id", "ticket_id", "sla", "target", "cycle", "calendar", "goal_minutes", "state",
              "started_at", "used_seconds", "running_since", "due_at", "stopped_at", "outcome",
              "next_level", "next_notice_at")


def settings():  # type: ignore[no-untyped-def]
    from mailgw.settings import Settings

    return Settings.model_validate({
        "hostname": "bench.test",
        "queues": [{"name": "support", "addresses": ["support@example.com"]}],
        "agents": [{"name": f"agent{i}", "addresses": [f"agent{i}@example.com"],
                    "queues": ["support"]} for i in range(10)],
        "slas": [{"name": "std", "first_response": 240, "defer_outside_hours": False,
                  "levels": [{"percent": 75}, {"percent": 100, "notify": ["owner", "queue_agents"],
                                                "actions": {"priority": "raise",
                                                            "tags": ["escalated"]}}]}],
    })


def rows(start: int, stop: int, due: set[int], now: datetime):  # type: ignore[no-untyped-def]
    """Tickets, articles and clocks for ids start..stop-1 (one of each per ticket)."""
    tickets, articles, clocks = [], [], []
    for i in range(start, stop):
        created = T0 + timedelta(seconds=i % 2_000_000)
        tickets.append((i, f"2026110210{i:07d}", f"Request {i}", "support", "open", 3,
                        f"c{i % 50_000}@customer.test", f"agent{i % 10}", created, created,
                        "[]", "{}", "std"))
        articles.append((i, i, "in", "customer", f"c{i % 50_000}@customer.test", "",
                         "support@example.com", "", f"Request {i}", "Please help.",
                         f"req{i}@customer.test", "new_ticket", "new ticket", False, created))
        if i in due:
            # started 200 of 240 minutes ago: the 75 % warning is due now
            since = now - timedelta(minutes=200)
            clocks.append((i, i, "std", "first_response", 0, None, 240, "running", since, 0,
                           since, since + timedelta(minutes=240), None, None, 0,
                           since + timedelta(minutes=180)))
        elif i % 5 < 2:
            # answered: stopped, nothing pending
            clocks.append((i, i, "std", "first_response", 0, None, 240, "stopped", created,
                           600, None, None, created + timedelta(minutes=10), "met", 0, None))
        else:
            # running, the next notice somewhere in the coming ten days
            nxt = now + timedelta(seconds=3600 + (i * 7919) % (10 * 86400))
            clocks.append((i, i, "std", "first_response", 0, None, 240, "running",
                           nxt - timedelta(minutes=180), 0, nxt - timedelta(minutes=180),
                           nxt + timedelta(minutes=60), None, None, 0, nxt))
    return tickets, articles, clocks


def load(engine, count: int, due: set[int], now: datetime) -> None:  # type: ignore[no-untyped-def]
    sqlite = engine.dialect.name == "sqlite"
    chunk = 50_000
    for lo in range(1, count + 1, chunk):
        data = rows(lo, min(count + 1, lo + chunk), due, now)
        write_rows(engine, [("tickets", TICKET_COLS, data[0]),
                          ("articles", ARTICLE_COLS, data[1]),
                          ("sla_clocks", CLOCK_COLS, data[2])])
        print(f"  loaded {min(count, lo + chunk - 1):,} tickets", flush=True)
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        if sqlite:
            cur.execute("ANALYZE")
            cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        else:
            for table in ("tickets", "articles", "sla_clocks"):
                cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                            f"(SELECT max(id) FROM {table}))")
            raw.commit()
            raw.driver_connection.autocommit = True
            for table in ("tickets", "articles", "sla_clocks"):
                cur.execute(f"VACUUM (ANALYZE) {table}")
            cur.execute("CHECKPOINT")
    finally:
        raw.close()


def reset(engine, due: list[int], now: datetime) -> None:  # type: ignore[no-untyped-def]
    """Put the due clocks back before their warning; drop what the last round made."""
    from sqlalchemy import delete, update

    from mailgw.store import models as m

    since = now - timedelta(minutes=200)
    with engine.begin() as c:
        c.execute(delete(m.SlaNotice))
        c.execute(delete(m.Outbox))
        c.execute(delete(m.Event))
        c.execute(delete(m.Article).where(m.Article.sender_type == "system"))
        c.execute(update(m.SlaClock).where(m.SlaClock.id.in_(due)).values(
            next_level=0, next_notice_at=since + timedelta(minutes=180), breached_at=None))
        c.execute(update(m.Ticket).where(m.Ticket.id.in_(due)).values(priority=3, tags=[]))
    if engine.dialect.name == "postgresql":
        # What autovacuum does in time: without it every round leaves the same 300 tickets
        # and clocks more dead row versions and index entries (a store where notices are
        # never deleted has none of these), and each round's tick reads more of them.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.exec_driver_sql("VACUUM sla_notices, outbox, events, articles, sla_clocks, tickets")


def claim_query(engine, now: datetime, batch: int):  # type: ignore[no-untyped-def]
    """The sweep's claim, as mailgw/sla/sweep.py issues it (older code: the clocks alone)."""
    from sqlalchemy import select

    from mailgw.sla import sweep
    from mailgw.store import models as m

    if hasattr(sweep, "claim_query"):
        return sweep.claim_query(now, batch, engine.dialect.name == "postgresql")
    q = (select(m.SlaClock).where(m.SlaClock.next_notice_at.is_not(None),
                                  m.SlaClock.next_notice_at <= now)
         .order_by(m.SlaClock.next_notice_at).limit(batch))
    return q if engine.dialect.name == "sqlite" else q.with_for_update(skip_locked=True)


def explain(engine, now: datetime, batch: int) -> str:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    q = claim_query(engine, now, batch)
    sqlite = engine.dialect.name == "sqlite"
    sql = str(q.compile(engine, compile_kwargs={"literal_binds": True}))
    with engine.connect() as c:
        plan = c.execute(text(("EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN ") + sql)).all()
    return "\n".join(f"   {r[-1]}" for r in plan)


def stats(values: list[float]) -> str:
    return (f"median {statistics.median(values):7.1f} ms  min {min(values):7.1f}  "
            f"max {max(values):7.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tickets", type=int, default=100_000)
    ap.add_argument("--due", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help="sla_sweep.batch_size (default 200)")
    ap.add_argument("--store", help="store URL (default: a temporary SQLite file)")
    ap.add_argument("--keep", action="store_true", help="keep the PostgreSQL schema")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    ap.add_argument("--db", help="SQLite file to load once and reuse (kept)")
    ap.add_argument("--schema", help="PostgreSQL schema to load once and reuse (kept)")
    ap.add_argument("--profile", action="store_true",
                    help="print a pyinstrument profile of the last busy tick (bench extra)")
    args = ap.parse_args()

    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    import mailgw
    from mailgw.outbound.render import Renderer
    from mailgw.sla.sweep import Sweeper
    from mailgw.store import models as m
    from mailgw.store.db import make_engine, migrate
    from mailgw.types import aware

    print(f"code: {Path(mailgw.__file__).parent}")
    tmp = None
    schema = None
    keep = args.keep or bool(args.schema)
    url = args.store
    if url is None:
        if args.db:
            url = f"sqlite:///{Path(args.db).resolve()}"
        else:
            tmp = tempfile.TemporaryDirectory(prefix="sla-bench-")
            url = f"sqlite:///{tmp.name}/mailgw.db"
    elif url.startswith("postgresql"):
        import psycopg

        schema = args.schema or f"sla_bench_{uuid.uuid4().hex[:8]}"
        dsn = url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        url = f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    engine = make_engine(url)
    backends: set[int] = set()
    if engine.dialect.name == "postgresql":
        from sqlalchemy import event

        @event.listens_for(engine, "connect")
        def _backend(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            with dbapi_conn.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                backends.add(cur.fetchone()[0])
            dbapi_conn.rollback()

    def server_ns() -> int:
        """CPU time of the PostgreSQL server processes serving this benchmark (local server:
        /proc/PID/schedstat, nanoseconds on the CPU)."""
        total = 0
        for pid in backends:
            try:
                total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        return total

    try:
        migrate(engine)
        step = max(1, args.tickets // max(1, args.due))
        due = [1 + k * step for k in range(min(args.due, args.tickets))]
        with engine.connect() as c:
            loaded = c.scalar(select(func.count()).select_from(m.Ticket))
            since = c.scalar(select(m.SlaClock.running_since).where(m.SlaClock.id == due[0]))
        if loaded:
            # a kept store: sweep at the instant it was loaded for
            assert loaded == args.tickets, f"the store holds {loaded:,} tickets"
            now = aware(since) + timedelta(minutes=200)
            print(f"{engine.dialect.name}: reusing {loaded:,} tickets loaded for {now}, "
                  f"{len(due)} due", flush=True)
        else:
            now = datetime.now(UTC).replace(microsecond=0)
            print(f"{engine.dialect.name}: loading {args.tickets:,} tickets, {len(due)} due ...",
                  flush=True)
            t = time.perf_counter()
            load(engine, args.tickets, set(due), now)
            print(f"  load took {time.perf_counter() - t:.0f} s")
        with engine.connect() as c:
            pending = c.scalar(select(func.count()).select_from(m.SlaClock)
                               .where(m.SlaClock.next_notice_at.is_not(None)))
        print(f"  {pending:,} clocks with a notice pending, {len(due)} of them due now")
        sweeper = Sweeper(engine, settings(), Renderer(ROOT / "templates"),
                          batch_size=args.batch)
        print("\nclaim plan:\n" + explain(engine, now, sweeper.batch_size))

        idle, claim, busy, busy_cpu, server_cpu, fired = [], [], [], [], [], 0
        for _ in range(args.rounds):
            reset(engine, due, now)
            # the claim alone, with the due clocks there: what grows with the store, if
            # anything does (rolled back)
            t = time.perf_counter()
            with Session(engine) as s, s.begin():
                n = len(s.execute(claim_query(engine, now, sweeper.batch_size)).all())
                s.rollback()
            claim.append((time.perf_counter() - t) * 1000)
            assert n == min(len(due), sweeper.batch_size)
            # idle: just before the due clocks' warnings
            t = time.perf_counter()
            r = sweeper.sweep(now - timedelta(minutes=30))
            idle.append((time.perf_counter() - t) * 1000)
            assert not r.fired, "nothing is due 30 minutes earlier"
            profiler = None
            if args.profile and _ == args.rounds - 1:
                from pyinstrument import Profiler

                profiler = Profiler(interval=0.0005)
                profiler.start()
            srv0 = server_ns()
            t, cpu0 = time.perf_counter(), time.process_time()
            r = sweeper.sweep(now)
            busy.append((time.perf_counter() - t) * 1000)
            busy_cpu.append((time.process_time() - cpu0) * 1000)
            server_cpu.append((server_ns() - srv0) / 1e6)
            if profiler is not None:
                profiler.stop()
                print(profiler.output_text(unicode=False, color=False, show_all=False))
            fired = len(r.fired)
            assert fired == len(due), f"fired {fired} of {len(due)}"
        print(f"\nidle tick (nothing due):         {stats(idle)}")
        print(f"claim of a batch ({n} due rows):  {stats(claim)}")
        print(f"busy tick ({fired} notices):      {stats(busy)}  "
              f"= {statistics.median(busy) / max(1, fired):.2f} ms a notice, "
              f"{sweeper.batch_size} per transaction")
        # CPU time of this process (SQLite's work included, PostgreSQL's server not): less
        # sensitive to other load on the machine than the wall clock.
        print(f"busy tick, this process's CPU:  {stats(busy_cpu)}")
        if backends:
            print(f"busy tick, PostgreSQL's CPU:    {stats(server_cpu)}  "
                  f"({len(backends)} server process(es))")
        print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        if args.json:
            print(json.dumps({"store": engine.dialect.name, "tickets": args.tickets,
                              "batch": sweeper.batch_size, "fired": fired, "idle_ms": idle,
                              "claim_ms": claim, "busy_ms": busy, "busy_cpu_ms": busy_cpu,
                              "server_cpu_ms": server_cpu if backends else None,
                              "loadavg": os.getloadavg()}))
    finally:
        engine.dispose()
        if schema and not keep:
            import psycopg

            with psycopg.connect(args.store.replace("postgresql+psycopg://", "postgresql://"),
                                 autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")
        if tmp:
            tmp.cleanup()


if __name__ == "__main__":
    main()
