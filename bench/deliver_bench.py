"""``mailgw deliver`` as an MTA pipe runs it: one process per message.

Starts ``mailgw run`` (its workers process what the pipes deliver; its SMTP listener stays
idle), then runs ``mailgw deliver --sender S --recipient R < message`` once per corpus
message, ``--parallel`` at a time (an MTA runs several pipe deliveries at once), and reports:

- wall time per invocation (p50/p99) and CPU time per invocation (user + system), peak RSS
  of one invocation: the cost an MTA pays per message;
- messages per second through the pipe, and end to end until the last is processed;
- latency from a ``deliver`` starting until the watcher sees the message processed.

    .venv/bin/python bench/deliver_bench.py --count 300 --parallel 2
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gen_corpus import generate  # noqa: E402
from smtp_bench import bench_store, free_port, make_home, start_gateway  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store")
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--workers", default="0",
                    help="mailgw run --workers: N or auto (0, the default: a worker thread, as in "
                         "the earlier results)")
    args = ap.parse_args()
    from sqlalchemy import create_engine, text

    corpus = generate(args.count, args.seed)
    n = len(corpus)
    # Byte-compile the mailgw that `mailgw deliver` will import, as an installed wheel is:
    # with PYTHONDONTWRITEBYTECODE set, every invocation would compile it again.
    pkg = subprocess.run([sys.executable, "-c", "import mailgw, os; "
                          "print(os.path.dirname(mailgw.__file__))"], cwd="/",
                         capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "compileall", "-q", pkg], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        home = make_home(Path(tmp), free_port(), None)  # nothing listens there: acks wait
        with bench_store(args.store, home) as url:
            extra = ["--workers", str(args.workers)]
            gw = start_gateway(home, url, free_port(), extra)
            env = {**os.environ, "MAILGW_HOME": str(home), "MAILGW_STORE_URL": url}
            cmd = [str(Path(sys.executable).with_name("mailgw")), "deliver",
                   "--sender", "bench@customer.test", "--recipient", "support@example.com"]
            walls: list[float] = []
            exited: dict[int, float] = {}
            failures: list[str] = []

            def one(raw: bytes) -> None:
                t, started = time.perf_counter(), time.time()
                p = subprocess.run(cmd, input=raw, env=env, capture_output=True)
                walls.append(time.perf_counter() - t)
                if p.returncode != 0 or b"queued as " not in p.stderr:
                    failures.append(f"exit {p.returncode}: {p.stderr[-300:]!r}")
                    return
                exited[int(p.stderr.rsplit(b"queued as ", 1)[1].split()[0])] = started

            engine = create_engine(url)
            seen: dict[int, float] = {}
            stop = threading.Event()

            def watcher() -> None:
                q = text("SELECT id FROM inbound WHERE state <> 'pending' AND id >= :low")
                low = 1
                while not stop.is_set() and len(seen) < n:
                    with engine.connect() as c:
                        ids = c.execute(q, {"low": low}).scalars().all()
                    now = time.time()
                    for i in ids:
                        seen.setdefault(i, now)
                    while low in seen:
                        low += 1
                    time.sleep(0.01)

            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            w = threading.Thread(target=watcher, daemon=True)
            t0 = time.perf_counter()
            w.start()
            with ThreadPoolExecutor(args.parallel) as pool:
                list(pool.map(one, [raw for _, raw in corpus]))
            t_pipe = time.perf_counter() - t0
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            w.join(600)
            t_done = time.perf_counter() - t0
            stop.set()
            gw.terminate()
            gw.wait(60)
            engine.dispose()
    if failures:
        raise SystemExit(f"{len(failures)} deliveries failed, first: {failures[0]}")
    cpu = (ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime) / n
    walls.sort()
    lat = sorted(seen[i] - t for i, t in exited.items() if i in seen)

    def pct(v: list[float], p: int) -> float:
        return v[min(len(v) - 1, int(len(v) * p / 100))] * 1000

    print(f"{n} messages through `mailgw deliver`, {args.parallel} at a time, store "
          f"{'SQLite' if not args.store else args.store.split('@')[-1]}")
    print(f"  per invocation: wall p50 {pct(walls, 50):.0f} ms, p99 {pct(walls, 99):.0f} ms, "
          f"CPU {cpu * 1000:.0f} ms, peak RSS {ru1.ru_maxrss / 1024:.0f} MB (largest child)")
    print(f"  pipe: {n / t_pipe:.1f} msg/s; end to end: {n / t_done:.1f} msg/s; "
          f"deliver started -> processed p50 {pct(lat, 50):.0f} ms, p99 {pct(lat, 99):.0f} ms "
          f"(mean wall {statistics.mean(walls) * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
