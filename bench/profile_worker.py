"""Profile the worker alone, in one process: queue the corpus, then drain it.

Prints the worker's rate (messages per second, CPU ms per message) and, with ``--profile``,
a pyinstrument call tree of where the time goes (``--html FILE`` writes the interactive one).
The intake and the sender do not run: this is the processing cost only.

    .venv/bin/python bench/profile_worker.py --count 1000 --profile
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gen_corpus import generate  # noqa: E402
from smtp_bench import bench_store  # noqa: E402


def _counts(engine) -> dict[str, int]:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    out = {}
    with engine.connect() as c:
        for table in ("tickets", "articles", "attachments", "outbox", "auto_replies"):
            out[table] = c.scalar(text(f"SELECT count(*) FROM {table}"))
        for state, n in c.execute(text("SELECT state, count(*) FROM inbound GROUP BY state "
                                       "ORDER BY state")):
            out[f"inbound {state}"] = n
        for kind, n in c.execute(text("SELECT type, count(*) FROM events GROUP BY type "
                                      "ORDER BY type")):
            out[f"event {kind}"] = n
    return out


def _dump(engine, out: Path) -> None:  # type: ignore[no-untyped-def]
    """Every row of the tables the worker writes, in id order, without the columns that differ
    between two runs by nature (times; the acknowledgement's bytes carry its Date): two
    versions of the code over the same corpus must write the same file."""
    import hashlib
    import json
    import re

    from sqlalchemy import DateTime, LargeBinary, MetaData, select

    # Our Message-IDs carry the time and a random part, VERP addresses the home's key.
    ours = re.compile(rb"mailgw\.[0-9]+\.[0-9]+\.[0-9a-f]+\.[a-z0-9]+@|(?<=bounces\+)"
                      rb"[0-9a-f]+-[a-z0-9]+(?=@)")
    meta = MetaData()
    meta.reflect(engine)
    with engine.connect() as c, out.open("w") as f:
        for name in ("tickets", "articles", "attachments", "events", "outbox", "auto_replies",
                     "inbound", "sla_clocks", "sla_segments"):
            if name not in meta.tables:
                continue
            table = meta.tables[name]
            cols = [col for col in table.columns if not isinstance(col.type, DateTime)
                    and col.name not in ("claimed_by",)]
            for row in c.execute(select(*cols).order_by(table.c.id)):
                values = {}
                for col, v in zip(cols, row, strict=True):
                    if isinstance(v, bytes | memoryview):
                        v = bytes(v)
                        if name == "outbox":  # Date: differs run to run
                            v = b"\n".join(line for line in v.split(b"\n")
                                           if not line.startswith(b"Date:"))
                        v = hashlib.sha256(ours.sub(b"<ours>", v)).hexdigest()
                    elif isinstance(col.type, LargeBinary) and v is None:
                        v = None
                    values[col.name] = v
                line = json.dumps(values, sort_keys=True, default=str)
                f.write(f"{name} {ours.sub(b'<ours>', line.encode()).decode()}\n")


def _backend_cpu(pids: set[int]) -> dict[int, float]:
    """CPU seconds (user + system) of PostgreSQL backend processes on this host."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # not on this host, or gone
        out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch-size", type=int,
                    help="the worker's batch size (default: the settings'; end to end at 8 "
                         "SMTP sessions the batches are ~23)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--html", type=Path)
    ap.add_argument("--cprofile", action="store_true",
                    help="cProfile on CPU time (process_time), top functions by own time")
    ap.add_argument("--cprofile-out", type=Path,
                    help="with --cprofile: also save the profile (pstats) to this file")
    ap.add_argument("--dump", type=Path,
                    help="write every stored row (times left out) to this file, to compare")
    args = ap.parse_args()

    from sqlalchemy import event

    from mailgw.home import init_home
    from mailgw.outbound.render import Renderer
    from mailgw.process import Context
    from mailgw.queue import put_many
    from mailgw.settings import Home, load_settings
    from mailgw.store.db import make_engine, migrate
    from mailgw.types import Envelope
    from mailgw.worker import Worker

    corpus = generate(args.count, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "home"
        init_home(path)
        home = Home.resolve(str(path))
        settings = load_settings(home)
        with bench_store(args.store, path) as url:
            engine = make_engine(url)
            backends: set[int] = set()
            if engine.dialect.name == "postgresql":
                # The server's CPU for this worker: its connections' backends (same host).
                @event.listens_for(engine, "connect")
                def _pid(dbapi_conn, record):  # type: ignore[no-untyped-def]
                    with dbapi_conn.cursor() as cur:
                        cur.execute("SELECT pg_backend_pid()")
                        backends.add(cur.fetchone()[0])
            migrate(engine)
            stamp = datetime.now(UTC)
            put_many(engine, [Envelope(raw=raw, mail_from="bench@customer.test",
                                       rcpt_tos=("support@example.com",), source="smtp",
                                       received_at=stamp) for _, raw in corpus])
            ctx = Context(settings, Renderer(home.templates))
            worker = Worker(engine, lambda: ctx, batch_size=args.batch_size or settings.worker.batch_size,
                            max_attempts=settings.worker.max_attempts)
            # Statements the worker sends (an executemany counts once): round trips on
            # PostgreSQL, and work its server does that the CPU figure leaves out.
            statements = {"statements": 0}

            @event.listens_for(engine, "before_cursor_execute")
            def _count(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
                statements["statements"] += 1
            # The worker's steps by thread CPU: the parse step runs outside any write
            # transaction, the store step (process() and the batch's writes) holds SQLite's
            # one write lock from BEGIN IMMEDIATE to its commit, the claim a short one.
            steps = {"_claim": 0.0, "_parse": 0.0, "_store": 0.0}

            def _timed(name):  # type: ignore[no-untyped-def]
                step = getattr(worker, name)

                def timed(*a, **kw):  # type: ignore[no-untyped-def]
                    t = time.thread_time()
                    try:
                        return step(*a, **kw)
                    finally:
                        steps[name] += time.thread_time() - t
                return timed
            for name in steps:
                setattr(worker, name, _timed(name))
            profiler = None
            if args.profile or args.html:
                from pyinstrument import Profiler

                profiler = Profiler(interval=0.0005)
                profiler.start()
            cprof = None
            if args.cprofile:
                import cProfile

                cprof = cProfile.Profile(time.process_time)
                cprof.enable()
            server0 = _backend_cpu(backends)
            c0, t0 = time.process_time(), time.perf_counter()
            while worker.run_batch():
                pass
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            sent = statements["statements"]
            server1 = _backend_cpu(backends)
            server = sum(v - server0.get(pid, 0.0) for pid, v in server1.items())
            if profiler:
                profiler.stop()
            if cprof:
                cprof.disable()
            counts = _counts(engine)
            if args.dump:
                _dump(engine, args.dump)
            engine.dispose()
    n = len(corpus)
    print(f"worker alone: {n} messages in {wall:.2f} s: {n / wall:.0f} msg/s, "
          f"{cpu * 1000 / n:.2f} ms CPU per message")
    # What was stored, to compare two versions of the code over the same corpus.
    print(f"statements: {sent / n:.2f} per message"
          + (f"; PostgreSQL backends {server * 1000 / n:.2f} ms CPU per message "
             f"({len(server1)} connection(s))" if server1 else ""))
    print("steps, thread CPU ms per message: "
          + ", ".join(f"{k.lstrip('_')} {v * 1000 / n:.2f}" for k, v in steps.items()))
    print("rows: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if cprof:
        import pstats

        if args.cprofile_out:
            cprof.dump_stats(args.cprofile_out)
        pstats.Stats(cprof).sort_stats("tottime").print_stats(40)
        pstats.Stats(cprof).sort_stats("cumulative").print_stats(60)
    if profiler:
        if args.html:
            args.html.write_text(profiler.output_html())
        else:
            print(profiler.output_text(unicode=True, color=False, show_all=False))


if __name__ == "__main__":
    main()
