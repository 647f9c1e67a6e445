"""The gateway process's CPU per message under SMTP load, thread by thread, and its profile.

Runs ``mailgw run --workers N`` as ``smtp_bench.py`` does (same home, corpus, sink and
clients), with ``bench/gwhook`` on the gateway's PYTHONPATH: each thread of the gateway
process carries its name as its OS thread name, so this script reads every thread's CPU
time (user + system, ``/proc/PID/task/*/stat``) when the gateway is ready and again when the
last acknowledgement has reached the sink, and prints the difference per message (and its
system part, ``sys``): the SMTP
intake (``main``: asyncio), the group commit (``intake-writer``), the sender, the scheduler
and the pipes to the worker processes. The worker processes are not counted (see
``profile_worker.py``). ``--cprofile DIR`` also profiles every thread of the gateway with
cProfile (``DIR/NN-thread.prof``, startup included; read them with ``pstats``), which slows
it down: compare CPU figures only between runs without it.

    .venv/bin/python bench/profile_gateway.py --count 1000 --workers 2 --runs 3

``--sender-alone`` measures the sender by itself in this process instead: ``--count``
acknowledgement-sized outbox rows are queued ``--per-pass`` at a time (as worker batches
commit them) and ``Sender.run_once`` sends them to ``LeanSink``; it reports the thread CPU
of ``run_once`` per mail (leasing, sending, recording), median over ``--runs``:

    .venv/bin/python bench/profile_gateway.py --sender-alone --count 1000 --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from floor import smtplib_send  # noqa: E402
from gen_corpus import generate  # noqa: E402
from smtp_bench import AckSink, bench_store, free_port, make_home, start_gateway  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def threads_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) per thread name of a process; same names are summed.
    ``NAME sys`` holds the system part alone."""
    out: dict[str, float] = defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        out[name] += (int(fields[11]) + int(fields[12])) / TICK
        out[f"{name} sys"] += int(fields[12]) / TICK
    return out


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def run_once(corpus: list[tuple[str, bytes]], args) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from aiosmtpd.controller import Controller
    from sqlalchemy import create_engine, text

    handler = AckSink()
    acked = handler.acked

    sink_port = free_port()
    sink = Controller(handler, hostname="127.0.0.1", port=sink_port)
    sink.start()
    n = len(corpus)
    hook = str(ROOT / "bench" / "gwhook")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "MAILGW_GWPROF", "MAILGW_GWPROF_CPROFILE")}
    with tempfile.TemporaryDirectory() as tmp:
        prof_dir = args.cprofile or tmp
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (hook, saved["PYTHONPATH"]) if p)
        os.environ["MAILGW_GWPROF"] = prof_dir
        os.environ["MAILGW_GWPROF_CPROFILE"] = "1" if args.cprofile else "0"
        try:
            home = make_home(Path(tmp), sink_port, None)
            with bench_store(args.store, home) as url:
                port = free_port()
                extra = ["--workers", str(args.workers)]
                proc = start_gateway(home, url, port, extra)
                before, total0 = threads_cpu(proc.pid), process_cpu(proc.pid)
                t0 = time.perf_counter()
                try:
                    smtplib_send(port, corpus, args.connections, timeout=120)
                except SystemExit:
                    proc.terminate()
                    raise
                engine = create_engine(url)
                deadline = time.time() + 1800
                while time.time() < deadline:
                    with engine.connect() as c:
                        pending = c.scalar(text("SELECT count(*) FROM inbound WHERE state = 'pending'"))
                        acks = c.scalar(text("SELECT count(*) FROM outbox"))
                    if not pending and len(acked) >= acks:
                        break
                    time.sleep(0.05)
                elapsed = time.perf_counter() - t0
                after, total1 = threads_cpu(proc.pid), process_cpu(proc.pid)
                engine.dispose()
                proc.terminate()
                proc.wait(120)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    sink.stop()
    per = {name: (after[name] - before.get(name, 0.0)) * 1000 / n for name in after}
    out = {"process": (total1 - total0) * 1000 / n, "msgs_per_s": n / elapsed}
    # The threads by role; the worker-pool pipes and APScheduler's threads are summed.
    groups = {"main": "smtp (main)", "intake-writer": "intake-writer", "sender": "sender"}
    for name, ms in per.items():
        base, _, part = name.partition(" ")
        key = groups.get(base, "pipes" if base.startswith("worker") else "other")
        key += f" {part}" if part else ""
        out[key] = out.get(key, 0.0) + ms
    return out


def sender_alone(args) -> None:  # type: ignore[no-untyped-def]
    """The sender's CPU per mail by itself (``--sender-alone``)."""
    from datetime import UTC, datetime, timedelta

    from lean_smtp import LeanSink
    from sqlalchemy import insert, text

    from mailgw.outbound.sender import Sender
    from mailgw.settings import Relay
    from mailgw.settings import Sender as SenderCfg
    from mailgw.store import models as m
    from mailgw.store.db import make_engine, migrate

    raw = (b"From: support@example.com\r\nTo: c@customer.test\r\nSubject: [Ticket#1] ack\r\n"
           b"In-Reply-To: <x@y>\r\nMessage-ID: <a@b>\r\n\r\n"
           + b"Hello there, we got your mail.\r\n" * 80)
    sink = LeanSink()
    sink.start()
    results = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            url = args.store or f"sqlite:///{tmp}/sender.db"
            if args.store:
                admin = make_engine(args.store)
                with admin.begin() as c:
                    c.execute(text("DROP SCHEMA IF EXISTS gw_sender_alone CASCADE"))
                    c.execute(text("CREATE SCHEMA gw_sender_alone"))
                url += ("&" if "?" in url else "?") + "options=-csearch_path%3Dgw_sender_alone"
            engine = make_engine(url)
            migrate(engine)
            sender = Sender(engine, Relay(host="127.0.0.1", port=sink.port), Path(tmp),
                            SenderCfg())
            cpu, sent, stamp = 0.0, 0, datetime.now(UTC) - timedelta(seconds=1)
            for start in range(0, args.count, args.per_pass):
                rows = [dict(mail_from=f"bounces+{i}@example.com", rcpt_tos=["c@customer.test"],
                             message_id=f"<{i}@example.com>", raw=raw, state="pending",
                             attempts=0, next_attempt_at=stamp, created_at=stamp)
                        for i in range(start, min(start + args.per_pass, args.count))]
                with engine.begin() as c:
                    c.execute(insert(m.Outbox), rows)
                t = time.thread_time()
                while (n := sender.run_once()):
                    sent += n
                cpu += time.thread_time() - t
            if hasattr(sender, "close_relay"):  # this script also runs against older code
                sender.close_relay()
            engine.dispose()
            if args.store:
                with admin.begin() as c:
                    c.execute(text("DROP SCHEMA IF EXISTS gw_sender_alone CASCADE"))
                admin.dispose()
        assert sent == args.count, sent
        results.append(cpu * 1000 / sent)
        print(f"run {run + 1}: sender run_once thread CPU {results[-1]:.3f} ms/mail", file=sys.stderr,
              flush=True)
    sink.stop()
    print(f"sender alone, {args.count} mails in passes of {args.per_pass}, store "
          f"{'SQLite' if not args.store else args.store.split('@')[-1]}: run_once thread CPU "
          f"median {statistics.median(results):.3f} ms/mail (runs "
          + " ".join(f"{v:.3f}" for v in results)
          + f"), load average {os.getloadavg()[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--cprofile", metavar="DIR",
                    help="profile every gateway thread with cProfile into DIR (slower)")
    ap.add_argument("--sender-alone", action="store_true",
                    help="measure Sender.run_once alone (see the module's docstring)")
    ap.add_argument("--per-pass", type=int, default=15,
                    help="--sender-alone: mails queued before each pass")
    args = ap.parse_args()
    if args.sender_alone:
        sender_alone(args)
        return
    if args.cprofile:
        Path(args.cprofile).mkdir(parents=True, exist_ok=True)
    corpus = generate(args.count, args.seed)
    results = []
    for i in range(args.runs):
        r = run_once(corpus, args)
        results.append(r)
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()),
              file=sys.stderr, flush=True)
    keys = sorted({k for r in results for k in r}, key=lambda k: (k != "process", k))
    print(f"gateway process CPU ms per message, {args.count} messages, {args.connections} "
          f"connections, --workers {args.workers}, store "
          f"{'SQLite' if not args.store else args.store.split('@')[-1]}, {args.runs} runs, "
          f"load average {os.getloadavg()[0]:.1f}")
    for k in keys:
        vals = [r.get(k, 0.0) for r in results]
        print(f"  {k:<16} median {statistics.median(vals):7.2f}   runs "
              + " ".join(f"{v:.2f}" for v in vals))


if __name__ == "__main__":
    main()
