"""Send the shared corpus through ``mailgw run`` over SMTP and measure messages per second."""

from __future__ import annotations

import argparse
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.corpus import iter_corpus_messages  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(messages: list[bytes], store: str | None, connections: int) -> dict[str, float]:
    import yaml
    from aiosmtpd.controller import Controller
    from sqlalchemy import create_engine, func, select

    from mailgw.home import init_home
    from mailgw.store import models as m

    received = []

    class Sink:
        async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
            received.append(1)
            return "250 OK"

    sink_port = free_port()
    sink = Controller(Sink(), hostname="127.0.0.1", port=sink_port)
    sink.start()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        init_home(home)
        cfg = yaml.safe_load((home / "config/mailgw.yaml").read_text())
        cfg["relay"] = {"host": "127.0.0.1", "port": sink_port}
        cfg["default_queue"] = "support"
        (home / "config/mailgw.yaml").write_text(yaml.safe_dump(cfg))
        schema = None
        url = store or f"sqlite:///{home / 'store/mailgw.db'}"
        if store and store.startswith("postgresql"):
            import psycopg

            schema = f"bench_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(store.replace("+psycopg", ""), autocommit=True) as c:
                c.execute(f"CREATE SCHEMA {schema}")
            url = f"{store}?options=-csearch_path%3D{schema}"
        port = free_port()
        env = {**os.environ, "MAILGW_HOME": str(home), "MAILGW_STORE_URL": url}
        proc = subprocess.Popen([sys.executable, "-m", "mailgw", "run", "--smtp",
                                 f"127.0.0.1:{port}"], env=env, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        for line in proc.stdout:
            if b"ready" in line:
                break
        else:
            raise SystemExit(f"mailgw run exited {proc.wait()} before it was ready")
        engine = create_engine(url)
        chunks = [messages[i::connections] for i in range(connections)]

        def client(chunk: list[bytes]) -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
                for raw in chunk:
                    s.sendmail("bench@customer.test", ["support@example.com"], raw)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in chunks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_intake = time.perf_counter() - t0
        while True:
            with engine.connect() as c:
                pending = c.scalar(select(func.count()).select_from(m.Inbound)
                                   .where(m.Inbound.state == "pending"))
            if pending == 0:
                break
            time.sleep(0.02)
        t_done = time.perf_counter() - t0
        while True:  # until the relay got each acknowledgement once (some it may refuse)
            with engine.connect() as c:
                unsent = c.scalar(select(func.count()).select_from(m.Outbox)
                                  .where(m.Outbox.attempts == 0))
            if unsent == 0:
                break
            if os.environ.get("BENCH_DEBUG"):
                print(f"{time.perf_counter() - t0:6.1f}s unsent {unsent} sink {len(received)}")
            time.sleep(0.5 if os.environ.get("BENCH_DEBUG") else 0.02)
        t_sent = time.perf_counter() - t0
        with engine.connect() as c:
            acks = c.scalar(select(func.count()).select_from(m.Outbox))
        proc.terminate()
        proc.wait(30)
        engine.dispose()
        if schema:
            import psycopg

            with psycopg.connect(store.replace("+psycopg", ""), autocommit=True) as c:  # type: ignore[union-attr]
                c.execute(f"DROP SCHEMA {schema} CASCADE")
    sink.stop()
    n = len(messages)
    return {"intake_per_s": n / t_intake, "processed_per_s": n / t_done,
            "acks": acks, "acks_done_s_after_processed": t_sent - t_done}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--store", help="store URL (default: SQLite in the temp home)")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N messages")
    args = ap.parse_args()
    # A real MTA sends CRLF line endings; some corpus files have bare LF.
    messages = [re.sub(rb"\r?\n", b"\r\n", raw) for _, raw in iter_corpus_messages()]
    if args.limit:
        messages = messages[: args.limit]
    results = [run_once(messages, args.store, args.connections) for _ in range(args.runs)]
    print(f"{len(messages)} messages, {args.connections} connections, {args.runs} runs, "
          f"store {'SQLite' if not args.store else args.store.split('@')[-1]}")
    print(f"  acknowledgements queued: {results[0]['acks']} (automatic mail gets none)")
    for key in ("intake_per_s", "processed_per_s", "acks_done_s_after_processed"):
        vals = [r[key] for r in results]
        print(f"  {key:<28} median {statistics.median(vals):8.1f}   runs "
              + " ".join(f"{v:.1f}" for v in vals))


if __name__ == "__main__":
    main()
