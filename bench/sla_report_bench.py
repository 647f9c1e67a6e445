"""`mailgw report sla` over a large store: how long the report takes, SQLite and PostgreSQL.

Bulk-loads ``--tickets`` tickets (default 100,000) created over four weeks, in four queues
and five priorities; nine in ten have an SLA, with a first-response clock, a solution clock
and for a third of them an update clock: most clocks decided (met or breached, with pauses:
``used_seconds`` below the wall time), some running, paused or cancelled; half of them on a
business calendar. Then builds the report of the four weeks (``build_report``, JSON-ready
dict, in ``--tz``) ``--rounds`` times and prints the wall time and this process's CPU time
(median, min, max; SQLite's work is in the process, PostgreSQL's server time is not) and
the growth of the process's peak RSS during the first round.

    .venv/bin/python bench/sla_report_bench.py                                  # SQLite, temporary
    .venv/bin/python bench/sla_report_bench.py --store sqlite:////tmp/r.db --keep   # load once
    .venv/bin/python bench/sla_report_bench.py --store sqlite:////tmp/r.db --no-load
    .venv/bin/python bench/sla_report_bench.py --store postgresql+psycopg://postgres@127.0.0.1/test --keep
    .venv/bin/python bench/sla_report_bench.py --store 'postgresql+psycopg://postgres@127.0.0.1/test?options=-csearch_path%3Dsla_report_x' --no-load

With ``--no-load`` the store is used as it is: compare two versions of the code on one store
by putting the other version first on ``PYTHONPATH`` (``git archive BASE | tar -x -C DIR``;
this script leaves ``PYTHONPATH`` ahead of the checkout), alternating the runs. ``--json``
prints the report's ``total`` too, to check that two versions agree.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after PYTHONPATH: another version of mailgw may go first

from bulk import write_rows  # noqa: E402 - bench/ is the script's directory

T0 = datetime(2026, 11, 2, 0, 0, tzinfo=UTC)
DAYS = 28
QUEUES = ("support", "billing", "sales", "ops")
TICKET_COLS = ("id", "number", "title", "queue", "state", "priority", "customer", "created_at",
               "updated_at", "tags", "custom_fields", "sla")
CLOCK_COLS = ("id", "ticket_id", "sla", "target", "cycle", "calendar", "goal_minutes", "state",
              "started_at", "used_seconds", "running_since", "due_at", "stopped_at", "outcome",
              "breached_at", "next_level", "next_notice_at")


def settings():  # type: ignore[no-untyped-def]
    from mailgw.settings import Settings

    return Settings.model_validate({
        "hostname": "bench.test",
        "queues": [{"name": q, "addresses": [f"{q}@example.com"]} for q in QUEUES],
        "calendars": [{"name": "office", "timezone": "Europe/Berlin",
                       **{d: ["09:00-17:00"] for d in ("mon", "tue", "wed", "thu", "fri")}}],
        "slas": [{"name": "std", "calendar": "office", "first_response": 60, "update": 120,
                  "solution": 2400},
                 {"name": "fast", "first_response": 30, "update": 60, "solution": 1440}],
    })


def rows(start: int, stop: int, count: int):  # type: ignore[no-untyped-def]
    """Tickets and clocks for ids start..stop-1; deterministic."""
    tickets, clocks = [], []
    span = DAYS * 86400
    for i in range(start, stop):
        created = T0 + timedelta(seconds=(i * span) // count, microseconds=(i * 7919) % 10**6)
        has_sla = i % 10 != 0
        business = i % 2 == 0
        sla = ("std" if business else "fast") if has_sla else None
        tickets.append((i, f"2026110210{i:07d}", f"Request {i}", QUEUES[i % 4], "open",
                        1 + (i * 31) % 5, f"c{i % 50_000}@customer.test", created, created,
                        "[]", "{}", sla))
        if not has_sla:
            continue
        cal = "office" if business else None
        for k, (target, cycle, goal) in enumerate((
                ("first_response", 0, 60 if business else 30),
                ("solution", 0, 2400 if business else 1440),
                ("update", 1, 120 if business else 60))):
            if target == "update" and i % 3:
                continue
            cid = i * 3 + k
            h = (i * 2654435761 + k * 40503) % 1000
            started = created + timedelta(hours=30 * k) if target == "update" else created
            wall = 60 + (h * 7919 + i) % (goal * 60 * 4)
            stopped = started + timedelta(seconds=wall, microseconds=(h * 977) % 10**6)
            used = int(wall * (0.4 + (h % 60) / 100))  # pauses and time outside hours
            if h < 780:  # decided
                outcome = "met" if used <= goal * 60 else "breached"
                breached = started + timedelta(seconds=goal * 60) if outcome == "breached" else None
                clocks.append((cid, i, sla, target, cycle, cal, goal, "stopped", started, used,
                               None, None, stopped, outcome, breached, 2, None))
            elif h < 830:  # cancelled (merged)
                clocks.append((cid, i, sla, target, cycle, cal, goal, "stopped", started, 0,
                               None, None, stopped, "cancelled", None, 0, None))
            elif h < 900:  # paused, some over their goal
                clocks.append((cid, i, sla, target, cycle, cal, goal, "paused", started,
                               used % (goal * 90), None, None, None, None, None, 0, None))
            else:  # running, due some time after the report's end or before it
                due = started + timedelta(seconds=goal * 60 * (1 + h % 5))
                clocks.append((cid, i, sla, target, cycle, cal, goal, "running", started, 0,
                               started, due, None, None, None, 0, due))
    return tickets, clocks


def load(engine, count: int) -> None:  # type: ignore[no-untyped-def]
    sqlite = engine.dialect.name == "sqlite"
    chunk = 50_000
    for lo in range(1, count + 1, chunk):
        data = rows(lo, min(count + 1, lo + chunk), count)
        write_rows(engine, [("tickets", TICKET_COLS, data[0]),
                          ("sla_clocks", CLOCK_COLS, data[1])])
        print(f"  loaded {min(count, lo + chunk - 1):,} tickets", flush=True)
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        if sqlite:
            cur.execute("ANALYZE")
            cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        else:
            raw.commit()
            raw.driver_connection.autocommit = True
            for table in ("tickets", "sla_clocks"):
                cur.execute(f"VACUUM (ANALYZE) {table}")
    finally:
        raw.close()


def _proc_cpu(pid: int | None) -> float | None:
    """User + system CPU time (ms) of a local process, from /proc (the PostgreSQL backend
    serving this bench's connection, when the server runs on this machine)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    import os

    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def stats(values: list[float]) -> str:
    return (f"median {statistics.median(values):8.1f} ms  min {min(values):8.1f}  "
            f"max {max(values):8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tickets", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tz", default="Europe/Berlin")
    ap.add_argument("--store", help="store URL (default: a temporary SQLite file)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the store (a PostgreSQL URL gets a new schema, printed)")
    ap.add_argument("--no-load", action="store_true", help="use the store as it is")
    ap.add_argument("--json", action="store_true", help="print the report's total")
    ap.add_argument("--profile", action="store_true",
                    help="print a pyinstrument profile of the last round (bench extra)")
    args = ap.parse_args()

    from sqlalchemy import func, select

    import mailgw
    from mailgw.sla.report import build_report
    from mailgw.store import models as m
    from mailgw.store.db import make_engine, migrate, read_session

    print(f"mailgw from {Path(mailgw.__file__).parent}")
    tmp = None
    schema = None
    url = args.store
    if url is None:
        tmp = tempfile.TemporaryDirectory(prefix="sla-report-bench-")
        url = f"sqlite:///{tmp.name}/mailgw.db"
    elif url.startswith("postgresql") and not args.no_load:
        import psycopg

        schema = f"sla_report_{uuid.uuid4().hex[:8]}"
        dsn = url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        url = f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
        print(f"schema {schema}: {url}")
    engine = make_engine(url)
    st = settings()
    try:
        if not args.no_load:
            migrate(engine)
            print(f"{engine.dialect.name}: loading {args.tickets:,} tickets ...", flush=True)
            t = time.perf_counter()
            load(engine, args.tickets)
            print(f"  load took {time.perf_counter() - t:.0f} s")
        with engine.connect() as c:
            n_clocks = c.scalar(select(func.count()).select_from(m.SlaClock))
            n_decided = c.scalar(select(func.count()).select_from(m.SlaClock).where(
                m.SlaClock.outcome.in_(("met", "breached"))))
        print(f"{engine.dialect.name}: {n_clocks:,} clocks, {n_decided:,} decided")
        start, end = T0, T0 + timedelta(days=DAYS)
        as_of = end + timedelta(days=1)
        wall, cpu, server, rss = [], [], [], None
        report = None
        for r in range(args.rounds):
            profiler = None
            if args.profile and r == args.rounds - 1:
                from pyinstrument import Profiler

                profiler = Profiler(interval=0.001)
                profiler.start()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            with read_session(engine) as s:  # as the CLI reads: no write lock on SQLite
                backend = (s.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
                           if engine.dialect.name == "postgresql" else None)
                b0 = _proc_cpu(backend)
                t, c0 = time.perf_counter(), time.process_time()
                report = build_report(s, st, start=start, end=end, tz=args.tz, as_of=as_of)
                wall.append((time.perf_counter() - t) * 1000)
                cpu.append((time.process_time() - c0) * 1000)
                b1 = _proc_cpu(backend)
                if b0 is not None and b1 is not None:
                    server.append(b1 - b0)
            if rss is None:
                rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
            if profiler is not None:
                profiler.stop()
                print(profiler.output_text(unicode=False, color=False, show_all=False))
        assert report is not None
        fr = report["total"]["targets"]["first_response"]
        print(f"report: {report['total']['tickets']:,} tickets, first response "
              f"{fr['met']:,} met / {fr['breached']:,} breached, "
              f"{len(report['series']['points'])} {report['series']['period']}s")
        print(f"report, wall:               {stats(wall)}")
        print(f"report, this process's CPU: {stats(cpu)}")
        if server:
            print(f"report, PostgreSQL backend CPU: {stats(server)}")
        print(f"peak RSS growth, first round: {rss:.0f} MB")
        if args.json:
            print(json.dumps({k: report[k] for k in ("total", "by_queue", "by_priority",
                                                     "series")}, sort_keys=True))
    finally:
        engine.dispose()
        if schema and not args.keep:
            import psycopg

            with psycopg.connect(args.store.replace("postgresql+psycopg://", "postgresql://"),
                                 autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")
        if tmp:
            tmp.cleanup()


if __name__ == "__main__":
    main()
