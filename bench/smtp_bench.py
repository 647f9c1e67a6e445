"""End-to-end benchmark: the generated corpus through ``mailgw run`` over SMTP.

Starts ``mailgw run`` in a fresh temporary home whose relay is an SMTP sink in this process,
sends the corpus (``gen_corpus.generate``) over ``--connections`` concurrent SMTP sessions,
and measures, per run:

- messages per second: corpus size / time from the first ``MAIL FROM`` until the last
  message is seen committed (``done``) in the store;
- intake messages per second (until the last ``250``);
- CPU milliseconds per message of the gateway (its process and its worker processes, user +
  system, from ``ready`` until the last acknowledgement reached the sink) — the benchmark's
  own clients and sink are not counted;
- latency ``250`` -> ticket committed: from the moment the client read our ``250`` until a
  watcher polling the store (every ``--poll`` seconds, which bounds the resolution) sees the
  inbound row ``done``;
- latency receipt -> auto-reply handed to the relay: from our ``250`` until the sink has the
  acknowledgement (matched by its ``In-Reply-To``);
- peak RSS (VmHWM) of the gateway process and of its largest worker process;
- where the rest of the machine's time goes, over the same interval as the gateway's CPU:
  the benchmark process's own CPU (its SMTP clients, the sink and the commit watcher:
  ``client_cpu_ms_per_msg``), the PostgreSQL server's CPU for the gateway's connections
  (``pg_cpu_ms_per_msg``; its background processes ``pg_bg_cpu_ms_per_msg``: ``PgCpu``),
  and the machine's idle share of its cores from ``/proc/stat`` (``machine_idle_pct``);
  the sink's acknowledgement rate (``sink_acks_per_s``, first to last ack);
- with ``--stats``: ``bench/e2ehook`` in the gateway and its workers, which time the SQLite
  write-lock waits (``BEGIN IMMEDIATE``) and commits, the worker's batches and its waits for
  a wake-up, and the sender's passes (printed per run, summed over the processes).

Each figure is the median over ``--runs`` runs, each in a new home and store.

    .venv/bin/python bench/smtp_bench.py --count 2000 --runs 3
    .venv/bin/python bench/smtp_bench.py --store postgresql+psycopg://postgres@127.0.0.1/test
"""

from __future__ import annotations

import argparse
import json
import os
import re
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gen_corpus import generate  # noqa: E402
from lean_smtp import LeanSink, send_all, wire_data  # noqa: E402

QUEUED = re.compile(rb"queued as (\d+)")
IN_REPLY_TO = re.compile(rb"^In-Reply-To:\s*<([^>]+)>", re.M | re.I)


class AckSink:
    """The relay of the gateway under test (an aiosmtpd handler): ``acked`` maps the
    customer's Message-ID each acknowledgement answers to the time the sink had it."""

    def __init__(self) -> None:
        self.acked: dict[str, float] = {}

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        t = time.time()
        hit = IN_REPLY_TO.search(envelope.original_content.split(b"\r\n\r\n", 1)[0])
        if hit:
            self.acked[hit.group(1).decode()] = t
        return "250 OK"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_kb(pid: int) -> int:
    """VmHWM: the process's peak resident set size, in KiB (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine_cpu() -> tuple[float, float]:
    """(busy, idle) seconds summed over all cores since boot, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / tick, idle / tick


def thread_cpu_s(thread: threading.Thread | None) -> float:
    """CPU seconds (user + system) of a live thread of this process (its CPU clock)."""
    if thread is None or thread.ident is None or not thread.is_alive():
        return 0.0
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except (OSError, AttributeError):
        return 0.0


def store_poller(url: str):  # type: ignore[no-untyped-def]
    """``fetch(low)``: ids >= low of inbound rows no longer pending, as the default watcher's
    query gives them, for the lean clients: through the database driver on one connection
    kept open, and without reading the rows. The default query (``id >= low AND state <>
    'pending'``) walks the table by id and, on SQLite, reads each row's ``state`` past its
    ``raw`` (overflow pages: a 200 KB message is 50 of them) at every poll; here the pending
    ids come from the covering index on ``state`` and the rest is ``max(id)``. That assumes
    ids without gaps: SQLite's rowids (a rolled-back insert frees its id) and PostgreSQL's
    sequence unless an intake commit failed, which fails the run anyway. Returns
    (fetch, close)."""
    # One statement, so one snapshot: the largest id and the pending ids are read together.
    sql = ("SELECT 0, max(id) FROM inbound UNION ALL "
           "SELECT 1, id FROM inbound WHERE state = 'pending' AND id >= {}")
    if url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(url.split(":///", 1)[1], isolation_level=None,
                               check_same_thread=False)
        q = sql.format("?")
        run, close = conn.execute, conn.close
    else:
        import psycopg

        pconn = psycopg.connect(url.replace("+psycopg", ""), autocommit=True,
                                application_name=app_name(url) + BENCH_APP)
        q = sql.format("%s")
        run, close = pconn.execute, pconn.close

    def fetch(low: int) -> list[int]:
        top, pending = 0, set()
        for kind, i in run(q, (low,)):
            if kind:
                pending.add(i)
            else:
                top = i or 0
        return [i for i in range(low, top + 1) if i not in pending]

    return fetch, close


def postgres_procs():  # type: ignore[no-untyped-def]
    """Every process whose name starts with "postgres", as listed now (the postmaster and
    every backend of every session on the machine): ``pg_snapshot_cpu_ms_per_msg``, the
    figure ``pg_cpu_ms_per_msg`` was before session 7, kept to compare with older RESULTS."""
    import psutil

    out = []
    for p in psutil.process_iter(["name"]):
        if (p.info["name"] or "").startswith("postgres"):
            out.append(p)
    return out


def _proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of any process on the machine (/proc/PID/stat), None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PgCpu:
    """The PostgreSQL server's CPU a run, attributed (issue 8, session 7).

    ``bench_store`` gives the gateway a URL with its own ``application_name`` (``app``);
    this benchmark's own connections (the commit watcher, the final counts) use
    ``app + BENCH_APP``. A thread polls ``pg_stat_activity`` every ``interval`` seconds:
    the backends named ``app`` (the gateway's and its worker processes') make
    ``pg_cpu_ms_per_msg``, the benchmark's ``pg_bench_cpu_ms_per_msg``; the server's
    background processes (walwriter, checkpointer, background writer, autovacuum launcher)
    ``pg_bg_cpu_ms_per_msg``, shared by every session of the server. Backends of anything else
    on the machine (other test runs) and the postmaster are not counted. A backend counts
    from the start (or its birth, if later) to its last poll or ``stop``; one that ends
    between two polls loses at most ``interval`` of its CPU (the gateway keeps its
    connections in a pool). CPU from /proc/PID/stat (clock ticks)."""

    def __init__(self, url: str, interval: float = 0.1):
        import psycopg

        self.app = app_name(url)
        self.interval = interval
        self.conn = psycopg.connect(url.replace("+psycopg", "").split("?", 1)[0], autocommit=True,
                                    application_name=self.app + "-cpu")
        self.me = self.conn.info.backend_pid
        self.datname = self.conn.info.dbname
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.kind: dict[int, str] = {}
        self._done = threading.Event()
        self.t0 = time.time()
        self.poll()
        self.thread = threading.Thread(target=self._run, name="pg-cpu", daemon=True)
        self.thread.start()

    def poll(self) -> None:
        rows = self.conn.execute(
            "SELECT pid, backend_type, application_name, backend_start FROM pg_stat_activity "
            "WHERE pid <> %s AND (datname = %s OR datname IS NULL)",
            (self.me, self.datname)).fetchall()
        for pid, btype, app, started in rows:
            if pid not in self.kind:
                if btype != "client backend":
                    kind = "background"
                elif app == self.app:
                    kind = "gateway"
                elif app == self.app + BENCH_APP:
                    kind = "bench"
                else:
                    kind = "other"  # another process's (another test run's) connection
                self.kind[pid] = kind
                if kind != "other":
                    born = started is not None and started.timestamp() > self.t0
                    base = 0.0 if born else _proc_cpu_s(pid)
                    if base is not None:
                        self.first[pid] = base
            if pid in self.first:
                cpu = _proc_cpu_s(pid)
                if cpu is not None:
                    self.last[pid] = cpu

    thread_cpu = 0.0  # this sampler thread's own CPU seconds (this process's, not a client's)

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a missed poll costs precision, not the run
                pass
        self.thread_cpu = time.thread_time()

    def stop(self) -> dict[str, float]:
        """Stop polling; CPU seconds by kind ("gateway", "bench", "background")."""
        self._done.set()
        self.thread.join()
        self.poll()
        self.conn.close()
        out = {"gateway": 0.0, "bench": 0.0, "background": 0.0}
        for pid, cpu in self.last.items():
            out[self.kind[pid]] += max(0.0, cpu - self.first[pid])
        return out


BENCH_APP = "-bench"  # appended to the gateway's application_name for our own connections


def app_name(url: str) -> str:
    """The ``application_name`` in a store URL ("" if none)."""
    from urllib.parse import parse_qs, urlsplit

    return parse_qs(urlsplit(url).query).get("application_name", [""])[0]


def cpu_seconds(procs) -> float:  # type: ignore[no-untyped-def]
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:  # noqa: BLE001 - a process that is gone counts nothing
            pass
    return total


@contextmanager
def bench_store(store: str | None, home: Path):
    """A store URL for one run: SQLite in the home, or a fresh PostgreSQL schema."""
    if not store or not store.startswith("postgresql"):
        yield store or f"sqlite:///{home / 'store/mailgw.db'}"
        return
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    plain = store.replace("+psycopg", "")
    with psycopg.connect(plain, autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {schema}")
    try:
        # application_name: PgCpu tells the gateway's connections from the rest by it
        yield f"{store}?options=-csearch_path%3D{schema}&application_name=mailgw-{schema}"
    finally:
        with psycopg.connect(plain, autocommit=True) as c:
            c.execute(f"DROP SCHEMA {schema} CASCADE")


def make_home(tmp: Path, relay_port: int, batch_size: int | None) -> Path:
    import yaml

    from mailgw.home import init_home

    home = tmp / "home"
    init_home(home)
    cfg = yaml.safe_load((home / "config/mailgw.yaml").read_text())
    cfg["relay"] = {"host": "127.0.0.1", "port": relay_port}
    cfg["default_queue"] = "support"
    if batch_size:
        cfg["worker"] = {"batch_size": batch_size}
    (home / "config/mailgw.yaml").write_text(yaml.safe_dump(cfg))
    return home


def start_gateway(home: Path, url: str, port: int, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "MAILGW_HOME": str(home), "MAILGW_STORE_URL": url}
    if stats_dir := os.environ.get("BENCH_E2ESTATS"):
        # bench/e2ehook: lock waits, commits, batches and wake-ups, per process.
        env["MAILGW_E2ESTATS"] = stats_dir
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "bench" / "e2ehook"), *filter(None, [env.get("PYTHONPATH")])])
    log = open(home / "gateway.log", "wb")  # noqa: SIM115 - closed with the process
    # BENCH_PROFILE=FILE: cProfile the gateway's main thread (the SMTP intake) into FILE.
    prof = os.environ.get("BENCH_PROFILE")
    prefix = ["-m", "cProfile", "-o", prof] if prof else []
    proc = subprocess.Popen([sys.executable, *prefix, "-m", "mailgw", "run", "--smtp",
                             f"127.0.0.1:{port}", *extra], env=env, stdout=subprocess.PIPE,
                            stderr=log)
    assert proc.stdout is not None
    for line in proc.stdout:
        if b"ready" in line:
            return proc
    raise SystemExit(f"mailgw run exited {proc.wait()} before it was ready: "
                     f"{(home / 'gateway.log').read_text()[-2000:]}")


# The IMAP variant is bench/imap_bench.py (it reuses make_home, bench_store and the sink).


def run_once(corpus: list[tuple[str, bytes]], store: str | None, args) -> dict[str, float]:  # type: ignore[no-untyped-def]
    import psutil
    from aiosmtpd.controller import Controller
    from sqlalchemy import create_engine, func, select, text

    from mailgw.store import models as m

    lean = args.client != "smtplib"
    if lean:  # the lighter load generator: one asyncio loop, lean sink, driver watcher
        sink = LeanSink()
        sink.start()
        acked, sink_port, sink_thread = sink.acked, sink.port, sink.thread
    else:
        handler = AckSink()
        acked = handler.acked  # customer Message-ID -> time the sink had our ack
        sink_port = free_port()
        sink = Controller(handler, hostname="127.0.0.1", port=sink_port)
        sink.start()
        sink_thread = sink._thread
    wired = [(mid, wire_data(raw)) for mid, raw in corpus] if lean else None
    thread_cpu: dict[str, list[float]] = {"send": [], "watch": []}  # thread CPU, s
    n = len(corpus)
    with tempfile.TemporaryDirectory() as tmp:
        home = make_home(Path(tmp), sink_port, args.batch_size)
        with bench_store(store, home) as url:
            port = free_port()
            extra = ["--workers", str(args.workers)]
            proc = start_gateway(home, url, port, extra)
            gw = psutil.Process(proc.pid)
            procs = [gw, *gw.children(recursive=True)]
            pg = postgres_procs() if url.startswith("postgresql") else []
            pg_cpu_by = PgCpu(url) if url.startswith("postgresql") else None
            cpu0, cpu0_main = cpu_seconds(procs), cpu_seconds([gw])
            pg0, self0, mach0 = cpu_seconds(pg), time.process_time(), machine_cpu()
            sink0 = thread_cpu_s(sink_thread)
            engine = create_engine(url, connect_args={"application_name": app_name(url) + BENCH_APP}
                                   if url.startswith("postgresql") else {})
            if lean:
                fetch_done, close_poller = store_poller(url)
            else:
                q = text("SELECT id FROM inbound WHERE id >= :low AND state <> 'pending'")

                def fetch_done(low: int) -> list[int]:
                    with engine.connect() as c:
                        return c.execute(q, {"low": low}).scalars().all()

                def close_poller() -> None:
                    pass
            sent: dict[int, tuple[str, float]] = {}  # inbound id -> (Message-ID, t of 250)
            committed: dict[int, float] = {}
            done_all = threading.Event()
            errors: list[str] = []

            def watcher() -> None:
                low = 1
                while not done_all.is_set():
                    ids = fetch_done(low)
                    t = time.time()
                    for i in ids:
                        committed.setdefault(i, t)
                    while low in committed:
                        low += 1
                    if len(committed) >= n:
                        done_all.set()
                        break
                    time.sleep(args.poll)
                thread_cpu["watch"].append(time.thread_time())

            def client(k: int, chunk: list[tuple[str, bytes]]) -> None:
                try:
                    with smtplib.SMTP("127.0.0.1", port, timeout=120) as s:
                        s.ehlo()
                        for j, (mid, raw) in enumerate(chunk):
                            if args.rate:  # an offered load: message k + j*connections
                                due = t0 + (k + j * args.connections) / args.rate
                                time.sleep(max(0.0, due - time.time()))
                            s.mail("bench@customer.test")
                            s.rcpt("support@example.com")
                            code, resp = s.data(raw)
                            t = time.time()
                            hit = QUEUED.search(resp)
                            if code != 250 or not hit:
                                errors.append(f"{code} {resp!r}")
                                continue
                            sent[int(hit.group(1))] = (mid, t)
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(repr(exc))
                thread_cpu["send"].append(time.thread_time())

            def lean_clients() -> None:
                def queued(mid: str, line: bytes, t: float) -> None:
                    hit = QUEUED.search(line)
                    if not hit:
                        errors.append(f"no queue id in {line!r}")
                        return
                    sent[int(hit.group(1))] = (mid, t)

                try:
                    send_all("127.0.0.1", port, wired, connections=args.connections,
                             pipeline=args.client == "pipelined", on_queued=queued,
                             rate=args.rate, t0=t0, wired=True)
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(repr(exc))
                thread_cpu["send"].append(time.thread_time())

            chunks = [corpus[i::args.connections] for i in range(args.connections)]
            w = threading.Thread(target=watcher, daemon=True)
            t0 = time.time()
            w.start()
            if lean:
                threads = [threading.Thread(target=lean_clients)]
            else:
                threads = [threading.Thread(target=client, args=(k, c))
                           for k, c in enumerate(chunks)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            t_intake = time.time() - t0
            if errors:
                done_all.set()
                proc.terminate()
                raise SystemExit(f"{len(errors)} send errors, first: {errors[0]}")
            w.join(timeout=1800)
            t_done = time.time() - t0
            with engine.connect() as c:
                acks = c.scalar(select(func.count()).select_from(m.Outbox))
                tickets = c.scalar(select(func.count()).select_from(m.Ticket))
                quarantined = c.scalar(select(func.count()).select_from(m.Inbound)
                                       .where(m.Inbound.state == "quarantined"))
                # messages held back at least once for their original (decision 31)
                held = c.scalar(select(func.count()).select_from(m.Inbound)
                                .where(m.Inbound.held_since.is_not(None)))
                shares = [k for _, k in c.execute(select(m.Inbound.claimed_by, func.count())
                                                   .group_by(m.Inbound.claimed_by))]
            deadline = time.time() + 600
            while len(acked) < acks and time.time() < deadline:
                time.sleep(0.02)
            procs = [gw, *gw.children(recursive=True)]
            pg_by = pg_cpu_by.stop() if pg_cpu_by else {"gateway": 0.0, "bench": 0.0,
                                                        "background": 0.0}
            # the sampler thread's CPU is this process's, not the clients'
            client_cpu = time.process_time() - self0 - (pg_cpu_by.thread_cpu if pg_cpu_by else 0.0)
            sink_cpu = thread_cpu_s(sink_thread) - sink0
            mach1 = machine_cpu()
            pg_snapshot = cpu_seconds(pg) - pg0
            cpu = cpu_seconds(procs) - cpu0
            cpu_main = cpu_seconds([gw]) - cpu0_main
            rss_main = peak_rss_kb(gw.pid)
            rss_workers = [peak_rss_kb(p.pid) for p in procs[1:]]
            proc.terminate()
            proc.wait(60)
            engine.dispose()
            close_poller()
            if args.keep_log:  # the gateway's and its workers' log, for the errors
                with open(args.keep_log, "ab") as f:
                    f.write((home / "gateway.log").read_bytes())
            if os.environ.get("BENCH_E2ESTATS"):
                print_stats(Path(os.environ["BENCH_E2ESTATS"]), n)
    sink.stop()
    lat_commit = sorted(committed[i] - t for i, (_, t) in sent.items() if i in committed)
    lat_ack = sorted(acked[mid] - t for mid, t in sent.values() if mid in acked)

    def pct(vals: list[float], p: int) -> float:
        return vals[min(len(vals) - 1, int(len(vals) * p / 100))] * 1000 if vals else float("nan")

    return {
        "msgs_per_s": n / t_done, "intake_per_s": n / t_intake,
        "cpu_ms_per_msg": cpu * 1000 / n, "cpu_ms_main_process": cpu_main * 1000 / n,
        "commit_p50_ms": pct(lat_commit, 50), "commit_p99_ms": pct(lat_commit, 99),
        "ack_p50_ms": pct(lat_ack, 50), "ack_p99_ms": pct(lat_ack, 99),
        "peak_rss_mb": rss_main / 1024, "worker_peak_rss_mb": max(rss_workers, default=0) / 1024,
        "busiest_worker_share": max(shares) / n if shares else 0.0,
        "client_cpu_ms_per_msg": client_cpu * 1000 / n,
        "client_send_ms_per_msg": sum(thread_cpu["send"]) * 1000 / n,
        "client_sink_ms_per_msg": sink_cpu * 1000 / n,
        "client_watch_ms_per_msg": sum(thread_cpu["watch"]) * 1000 / n,
        # the server's CPU for the gateway's and its workers' connections (PgCpu)
        "pg_cpu_ms_per_msg": pg_by["gateway"] * 1000 / n,
        "pg_bg_cpu_ms_per_msg": pg_by["background"] * 1000 / n,  # walwriter, checkpointer, ...
        "pg_bench_cpu_ms_per_msg": pg_by["bench"] * 1000 / n,  # the watcher's connection
        "pg_sampler_cpu_ms_per_msg": (pg_cpu_by.thread_cpu if pg_cpu_by else 0.0) * 1000 / n,
        # before session 7: every postgres process listed once after start (postmaster and
        # other sessions' backends in, later backends out); for comparisons with old RESULTS
        "pg_snapshot_cpu_ms_per_msg": pg_snapshot * 1000 / n,
        "machine_busy_ms_per_msg": (mach1[0] - mach0[0]) * 1000 / n,
        "machine_idle_pct": 100 * (mach1[1] - mach0[1]) / max(
            1e-9, (mach1[0] - mach0[0]) + (mach1[1] - mach0[1])),
        "sink_acks_per_s": (len(acked) - 1) / (max(acked.values()) - min(acked.values()))
        if len(acked) > 1 else 0.0,
        "tickets": tickets, "acks": acks, "acks_at_sink": len(acked), "quarantined": quarantined,
        "held": held,
    }


def print_stats(stats_dir: Path, n: int) -> None:
    """Sum and print bench/e2ehook's counters of the run just ended, then clear them."""
    total: dict[str, list[float]] = {}
    files = sorted(stats_dir.glob("*.json"))
    for f in files:
        for k, (c, s) in json.loads(f.read_text()).items():
            t = total.setdefault(k, [0, 0.0])
            t[0] += c
            t[1] += s
        f.unlink()
    print(f"  e2ehook ({len(files)} processes, {n} messages):", file=sys.stderr)
    for k, (c, s) in sorted(total.items()):
        print(f"    {k:<44} n {int(c):6d}  total {s * 1000:9.1f} ms  mean "
              f"{s * 1000 / max(c, 1):7.2f} ms", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", help="store URL (default: SQLite in the temp home)")
    ap.add_argument("--count", type=int, default=2000, help="corpus size (gen_corpus)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", default="auto",
                    help="pass --workers N|auto to mailgw run (0: the worker as a thread of the "
                         "gateway; auto, the default: mailgw run's own choice, decision 39)")
    ap.add_argument("--batch-size", type=int, default=0, help="worker.batch_size (0: default)")
    ap.add_argument("--poll", type=float, default=0.01, help="commit watcher interval, s")
    ap.add_argument("--rate", type=float, default=0,
                    help="offer this many messages per second (0: as fast as possible); "
                         "latencies below saturation")
    ap.add_argument("--client", choices=("smtplib", "lean", "pipelined"), default="smtplib",
                    help="load generator: smtplib (default: one thread per connection, "
                         "aiosmtpd sink, SQLAlchemy watcher; comparable with earlier "
                         "RESULTS), lean (one asyncio loop, one command a reply, lean sink, "
                         "driver watcher; bench/lean_smtp.py) or pipelined (lean with "
                         "RFC 2920 command groups; mailgw run advertises PIPELINING)")
    ap.add_argument("--json", action="store_true", help="print the medians as JSON")
    ap.add_argument("--stats", action="store_true",
                    help="time lock waits, commits, batches and wake-ups (bench/e2ehook)")
    ap.add_argument("--keep-log", metavar="FILE",
                    help="append each run's gateway log (workers included) to FILE")
    ap.add_argument("--flock", action="store_true",
                    help="experiment: SQLite writers queue on a file lock (bench/e2ehook)")
    args = ap.parse_args()
    if args.flock:
        args.stats = True
        os.environ["MAILGW_E2E_FLOCK"] = "1"
    if args.stats:
        os.environ["BENCH_E2ESTATS"] = tempfile.mkdtemp(prefix="e2estats-")
    corpus = generate(args.count, args.seed)
    results = []
    for i in range(args.runs):
        r = run_once(corpus, args.store, args)
        results.append(r)
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in r.items()), file=sys.stderr, flush=True)
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}
    if args.json:
        print(json.dumps(med))
        return
    size = sum(len(r) for _, r in corpus)
    print(f"{args.count} messages ({size / 1e6:.1f} MB, seed {args.seed}), "
          f"{args.connections} connections, {args.runs} runs, workers "
          f"{args.workers}, client {args.client}, store "
          f"{'SQLite' if not args.store else args.store.split('@')[-1]}")
    for k, v in med.items():
        runs = " ".join(f"{r[k]:.1f}" for r in results)
        print(f"  {k:<20} median {v:9.1f}   runs {runs}")


if __name__ == "__main__":
    main()
