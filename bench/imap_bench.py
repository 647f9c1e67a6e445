"""End to end over IMAP: the corpus in a real Dovecot mailbox, read by ``mailgw run``.

Starts an unprivileged Dovecot on a free loopback port (``tests/imap_server.py``, the one the
IMAP tests use), APPENDs the generated corpus to a fresh user's INBOX, then starts two
``mailgw run`` processes on a fresh home and store whose mailbox is that INBOX:

- the poller, ``mailgw run --role imap``: its CPU is the poller's own cost (fetch, ledger,
  inbound rows, moving each message to ``Processed``);
- the processing side, ``mailgw run --role worker --role sender`` (``--workers N`` passed
  through), with the relay pointed at an SMTP sink in this process.

It waits until every message is processed and every acknowledgement reached the sink, and
reports messages per second (from the poller's ``ready`` until the last message is
processed), the intake rate (until the last inbound row is committed), CPU ms per message of
each side and of Dovecot, and the poller's peak RSS. Median of ``--runs`` runs.

    .venv/bin/python bench/imap_bench.py --count 1000 --runs 3
    .venv/bin/python bench/imap_bench.py --count 1000 --runs 3 \\
        --store postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gen_corpus import generate  # noqa: E402
from smtp_bench import (  # noqa: E402
    AckSink,
    bench_store,
    cpu_seconds,
    free_port,
    make_home,
    peak_rss_kb,
)


def start(home: Path, url: str, args: list[str], log: str) -> subprocess.Popen:
    env = {**os.environ, "MAILGW_HOME": str(home), "MAILGW_STORE_URL": url}
    err = open(home / log, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "mailgw", "run", *args], env=env,
                            stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    for line in proc.stdout:
        if b"ready" in line:
            return proc
    raise SystemExit(f"mailgw run {' '.join(args)} exited {proc.wait()} before it was ready: "
                     f"{(home / log).read_text()[-2000:]}")


def run_once(server, corpus: list[tuple[str, bytes]], store: str | None, args) -> dict[str, float]:  # type: ignore[no-untyped-def]
    import psutil
    import yaml
    from aiosmtpd.controller import Controller
    from sqlalchemy import create_engine, func, select

    from mailgw.store import models as m

    handler = AckSink()
    acked = handler.acked

    user, password = f"b{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    server.add_user(user, password)
    t = time.perf_counter()
    with server.client(user) as c:
        for _, raw in corpus:
            c.append("INBOX", raw)
    append_s = time.perf_counter() - t
    n = len(corpus)
    sink_port = free_port()
    sink = Controller(handler, hostname="127.0.0.1", port=sink_port)
    sink.start()
    dovecot = psutil.Process(server.proc.pid)
    with tempfile.TemporaryDirectory() as tmp:
        home = make_home(Path(tmp), sink_port, args.batch_size)
        cfg = yaml.safe_load((home / "config/mailgw.yaml").read_text())
        cfg["mailboxes"] = [{
            "name": "bench", "host": "127.0.0.1", "port": server.port, "tls": "plain",
            "username": user, "password": password, "queue": "support",
            "poll_interval": 1, "batch_size": args.imap_batch}]
        (home / "config/mailgw.yaml").write_text(yaml.safe_dump(cfg))
        with bench_store(store, home) as url:
            extra = ["--workers", str(args.workers)]
            work = start(home, url, ["--role", "worker", "--role", "sender", *extra],
                         "worker.log")
            wp = psutil.Process(work.pid)
            work_procs = [wp, *wp.children(recursive=True)]
            dove_procs = [dovecot, *dovecot.children(recursive=True)]
            cpu_work0, cpu_dove0 = cpu_seconds(work_procs), cpu_seconds(dove_procs)
            t_start = time.perf_counter()
            poll = start(home, url, ["--role", "imap"], "imap.log")
            t0 = time.perf_counter()
            t_ready = t0 - t_start
            pp = psutil.Process(poll.pid)
            engine = create_engine(url)
            t_intake = None
            deadline = time.perf_counter() + 1800
            while time.perf_counter() < deadline:
                with engine.connect() as c:
                    rows = c.scalar(select(func.count()).select_from(m.Inbound))
                    pending = c.scalar(select(func.count()).select_from(m.Inbound)
                                       .where(m.Inbound.state == "pending"))
                if t_intake is None and rows >= n:
                    t_intake = time.perf_counter() - t0
                if rows >= n and pending == 0:
                    break
                time.sleep(args.poll)
            t_done = time.perf_counter() - t0
            # the poller moves each message after its commit: wait for the last moves
            while time.perf_counter() < deadline:
                with server.client(user) as c:
                    c.select_folder("INBOX", readonly=True)
                    if not c.search("ALL"):
                        break
                time.sleep(0.05)
            cpu_poll = cpu_seconds([pp])
            with engine.connect() as c:
                acks = c.scalar(select(func.count()).select_from(m.Outbox))
                tickets = c.scalar(select(func.count()).select_from(m.Ticket))
                quarantined = c.scalar(select(func.count()).select_from(m.Inbound)
                                       .where(m.Inbound.state == "quarantined"))
                rows = c.scalar(select(func.count()).select_from(m.Inbound))
            while len(acked) < acks and time.perf_counter() < deadline:
                time.sleep(0.02)
            work_procs = [wp, *wp.children(recursive=True)]
            cpu_work = cpu_seconds(work_procs) - cpu_work0
            cpu_dove = cpu_seconds([dovecot, *dovecot.children(recursive=True)]) - cpu_dove0
            rss_poll = peak_rss_kb(pp.pid)
            for proc in (poll, work):
                proc.terminate()
            for proc in (poll, work):
                proc.wait(60)
            engine.dispose()
    sink.stop()
    return {
        "msgs_per_s": n / t_done, "intake_per_s": n / (t_intake or t_done),
        "cpu_ms_per_msg": (cpu_poll + cpu_work) * 1000 / n,
        "cpu_ms_poller": cpu_poll * 1000 / n, "cpu_ms_worker_sender": cpu_work * 1000 / n,
        "cpu_ms_dovecot": cpu_dove * 1000 / n, "poller_ready_s": t_ready,
        "poller_peak_rss_mb": rss_poll / 1024, "append_s": append_s,
        "inbound": rows, "tickets": tickets, "acks": acks, "acks_at_sink": len(acked),
        "quarantined": quarantined,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", help="store URL (default: SQLite in the temp home)")
    ap.add_argument("--count", type=int, default=1000, help="corpus size (gen_corpus)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", default="0",
                    help="pass --workers N|auto to the processing side (0, the default: a "
                         "worker thread, as in the earlier results)")
    ap.add_argument("--batch-size", type=int, default=0, help="worker.batch_size (0: default)")
    ap.add_argument("--imap-batch", type=int, default=50, help="the mailbox's batch_size")
    ap.add_argument("--poll", type=float, default=0.05, help="progress check interval, s")
    args = ap.parse_args()
    from tests.imap_server import start_dovecot

    corpus = generate(args.count, args.seed)
    servers = start_dovecot(tls=False)
    server = next(servers)
    results = []
    try:
        for i in range(args.runs):
            r = run_once(server, corpus, args.store, args)
            results.append(r)
            print(f"run {i + 1}: " + ", ".join(
                f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()),
                file=sys.stderr, flush=True)
    finally:
        next(servers, None)  # stops Dovecot and removes its directory
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}
    size = sum(len(r) for _, r in corpus)
    print(f"{args.count} messages ({size / 1e6:.1f} MB, seed {args.seed}) over IMAP "
          f"(mailbox batch {args.imap_batch}), {args.runs} runs, workers "
          f"{'thread' if args.workers == '0' else args.workers}, store "
          f"{'SQLite' if not args.store else args.store.split('@')[-1]}")
    for k, v in med.items():
        runs = " ".join(f"{r[k]:.1f}" for r in results)
        print(f"  {k:<22} median {v:9.1f}   runs {runs}")


if __name__ == "__main__":
    main()
