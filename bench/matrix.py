"""The end-to-end table of bench/RESULTS.md in one command: ``smtp_bench.py`` for each store,
client and connection count, one markdown row per combination (medians, with each run's
rate), headed by the date, the machine, the commit and the load average.

    .venv/bin/python bench/matrix.py                      # SQLite and PostgreSQL, smtplib
                                                          # and lean, 8 connections, 3 runs
    .venv/bin/python bench/matrix.py --stores sqlite --clients lean --connections 8,32,64

Each combination is a separate ``smtp_bench.py --json`` process (its own temporary home and,
on PostgreSQL, its own schema), run one after the other: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
RUN_LINE = re.compile(r"^run \d+: .*?msgs_per_s ([\d.]+)", re.M)
COLUMNS = [  # (smtp_bench's key, the table's heading, format)
    ("msgs_per_s", "msg/s", "{:.1f}"),
    ("intake_per_s", "intake msg/s", "{:.0f}"),
    ("cpu_ms_per_msg", "CPU ms/msg gateway + workers", "{:.2f}"),
    ("cpu_ms_main_process", "of which gateway", "{:.2f}"),
    ("pg_cpu_ms_per_msg", "PostgreSQL CPU", "{:.2f}"),
    ("client_cpu_ms_per_msg", "client CPU", "{:.2f}"),
    ("machine_idle_pct", "idle %", "{:.0f}"),
    ("commit_p50_ms", "250 -> committed p50 ms", "{:.0f}"),
    ("commit_p99_ms", "p99 ms", "{:.0f}"),
    ("ack_p50_ms", "ack p50 ms", "{:.0f}"),
    ("tickets", "tickets", "{:.0f}"),
    ("acks_at_sink", "acks", "{:.0f}"),
    ("quarantined", "quarantined", "{:.0f}"),
]


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model or platform.processor() or 'unknown'}), " \
           f"Python {platform.python_version()}"


def commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(HERE), "log", "-1", "--format=%h %s"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--", ".."],
                               capture_output=True, text=True).stdout.strip()
        return out + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(store: str, client: str, connections: int, args: argparse.Namespace) -> tuple[dict, list[str], float]:
    cmd = [sys.executable, str(HERE / "smtp_bench.py"), "--count", str(args.count),
           "--runs", str(args.runs), "--workers", str(args.workers), "--client", client,
           "--connections", str(connections), "--json"]
    if store == "postgresql":
        cmd += ["--store", args.pg_url]
    load = os.getloadavg()[0]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stderr)
        raise SystemExit(f"smtp_bench.py failed ({p.returncode}): {' '.join(cmd)}")
    return json.loads(p.stdout), RUN_LINE.findall(p.stderr), load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stores", default="sqlite,postgresql", help="sqlite,postgresql")
    ap.add_argument("--clients", default="smtplib,lean", help="smtplib,lean,pipelined")
    ap.add_argument("--connections", default="8", help="comma-separated counts")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", default="auto",
                    help="smtp_bench.py --workers: N or auto (mailgw run's default)")
    ap.add_argument("--pg-url", default=os.environ.get("MAILGW_BENCH_PG", PG_URL))
    args = ap.parse_args()
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    for s in stores:
        if s not in ("sqlite", "postgresql"):
            ap.error(f"--stores: unknown store {s!r} (sqlite, postgresql)")
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    conns = [int(c) for c in args.connections.split(",") if c.strip()]

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"{started}, {machine()}, commit {commit()}")
    print(f"`smtp_bench.py --count {args.count} --runs {args.runs} --workers {args.workers}`, "
          "medians (each run's msg/s in brackets)\n")
    print("| store | client | connections | load | " + " | ".join(h for _, h, _ in COLUMNS) + " |")
    print("| --- " * (4 + len(COLUMNS)) + "|")
    for store in stores:
        for client in clients:
            for n in conns:
                med, runs, load = run(store, client, n, args)
                cells = []
                for key, _, fmt in COLUMNS:
                    value = med.get(key)
                    cells.append("-" if value is None else fmt.format(value))
                cells[0] = f"**{cells[0]}** ({' '.join(runs)})"
                print(f"| {'SQLite' if store == 'sqlite' else 'PostgreSQL'} | {client} | {n} | "
                      f"{load:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
