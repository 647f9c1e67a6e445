"""Memory: one 25 MB message with attachments through ``mailgw run``, peak RSS per process.

Builds a reproducible message of about ``--mb`` MB (a text and an HTML body, three base64
attachments), starts ``mailgw run --workers 1`` (so intake and worker are separate processes
and each one's peak is its own; ``--workers 0`` measures the single process), sends the
message over SMTP, waits until it is processed and its acknowledgement reached the relay,
and reports per process: resident set size when ready (baseline), peak (VmHWM) and the
growth, as a multiple of the message size. The target (issue 8): under 3x.

``--deliver`` then pipes the small message and the big one into ``mailgw deliver`` (one
process each, as an MTA pipe runs it, with the gateway running so the store is migrated)
and reports each invocation's peak RSS (``ru_maxrss``); the big one's growth is counted
from the small one's peak.

    .venv/bin/python bench/memory.py --mb 25
    .venv/bin/python bench/memory.py --mb 25 --deliver
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from smtp_bench import bench_store, free_port, make_home, peak_rss_kb, start_gateway  # noqa: E402


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def big_message(mb: float, seed: int = 7) -> bytes:
    rnd = random.Random(seed)
    # Three attachments sharing the size: base64 adds a third, so raw bytes are 3/4 of it.
    parts_raw = [int(mb * 1e6 * share * 0.75) for share in (0.5, 0.3, 0.2)]
    boundary = "big-boundary"
    out = [
        "From: Big Sender <big@customer.test>\r\nTo: support@example.com\r\n"
        "Subject: Logs and screenshots\r\nMessage-ID: <big.1@customer.test>\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n"
        f"--{boundary}\r\nContent-Type: multipart/alternative; boundary=\"alt\"\r\n\r\n"
        "--alt\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThe logs are attached.\r\n"
        "--alt\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        "<p>The <b>logs</b> are attached.</p>\r\n--alt--\r\n"
    ]
    for i, (size, (ctype, name)) in enumerate(zip(parts_raw, [
            ("application/zip", "logs.zip"), ("image/png", "screen.png"),
            ("application/pdf", "report.pdf")], strict=True)):
        data = base64.encodebytes(rnd.randbytes(size)).replace(b"\n", b"\r\n").decode()
        out.append(f"--{boundary}\r\nContent-Type: {ctype}; name=\"{name}\"\r\n"
                   "Content-Transfer-Encoding: base64\r\n"
                   f"Content-Disposition: attachment; filename=\"{name}\"\r\n\r\n{data}")
        del i
    out.append(f"--{boundary}--\r\n")
    return "".join(out).encode()


WARM_UP = (b"From: Big Sender <big@customer.test>\r\nTo: support@example.com\r\n"
           b"Subject: Before the logs\r\nMessage-ID: <warm.1@customer.test>\r\n\r\n"
           b"The logs follow.\r\n")


def deliver_peak_kb(home: Path, url: str, message: bytes) -> int:
    """Run ``mailgw deliver`` once with ``message`` on stdin; its peak RSS in KiB.

    Measured by ``/usr/bin/time -f %M``: a child's ``ru_maxrss`` would include the RSS of
    this (large) process it was forked from."""
    env = {**os.environ, "MAILGW_HOME": str(home), "MAILGW_STORE_URL": url}
    p = subprocess.run(["/usr/bin/time", "-f", "maxrss %M", sys.executable, "-m", "mailgw",
                        "deliver", "--sender", "big@customer.test", "--recipient",
                        "support@example.com"], env=env, input=message, capture_output=True)
    if p.returncode != 0:
        raise SystemExit(f"mailgw deliver exited {p.returncode}: {p.stderr[-500:]!r}")
    return int(p.stderr.rsplit(b"maxrss ", 1)[1].split()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=25)
    ap.add_argument("--store")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-warm", dest="warm", action="store_false",
                    help="take the baseline before any message (the first one's imports count)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="send the big message this many times (the peak over all of them)")
    ap.add_argument("--deliver", action="store_true",
                    help="also measure `mailgw deliver` with the small and the big message")
    args = ap.parse_args()
    import psutil
    from aiosmtpd.controller import Controller
    from sqlalchemy import create_engine, text

    raw = big_message(args.mb)
    got = []

    class Sink:
        async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
            got.append(len(envelope.original_content))
            return "250 OK"

    sink_port = free_port()
    sink = Controller(Sink(), hostname="127.0.0.1", port=sink_port)
    sink.start()
    with tempfile.TemporaryDirectory() as tmp:
        home = make_home(Path(tmp), sink_port, None)
        with bench_store(args.store, home) as url:
            port = free_port()
            extra = ["--workers", str(args.workers)]
            proc = start_gateway(home, url, port, extra)
            gw = psutil.Process(proc.pid)
            procs = [gw, *gw.children(recursive=True)]
            time.sleep(1)
            engine = create_engine(url)

            def send(message: bytes, acks: int) -> str:
                with smtplib.SMTP("127.0.0.1", port, timeout=300) as s:
                    s.sendmail("big@customer.test", ["support@example.com"], message)
                t0 = time.perf_counter()
                while True:
                    with engine.connect() as c:
                        state = c.scalar(text("SELECT state FROM inbound ORDER BY id DESC LIMIT 1"))
                    if state != "pending":
                        break
                    time.sleep(0.05)
                while len(got) < acks and time.perf_counter() - t0 < 300:
                    time.sleep(0.05)
                return state

            cold = {p.pid: rss_kb(p.pid) for p in procs}
            if args.warm:
                # A small message first: the first message imports what the worker imports
                # lazily (bleach, the templates) and warms caches; that is not its size.
                send(WARM_UP, 1)
            base = {p.pid: rss_kb(p.pid) for p in procs}
            t0 = time.perf_counter()
            for i in range(args.repeat):
                # Another Message-ID each time (same size); only the first waits for its ack
                # (the auto-reply rate limit may hold back the others).
                one = raw.replace(b"<big.1@", f"<big.{i % 10}@".encode(), 1)
                state = send(one, len(got) + (i == 0))
            elapsed = time.perf_counter() - t0
            peaks = {p.pid: peak_rss_kb(p.pid) for p in procs}
            deliver = None
            if args.deliver:
                small_kb = deliver_peak_kb(home, url, WARM_UP)
                big_kb = deliver_peak_kb(home, url, raw)
                deliver = (small_kb, big_kb)
            proc.terminate()
            proc.wait(60)
            engine.dispose()
    sink.stop()
    size_mb = len(raw) / 2**20
    print(f"message {len(raw) / 1e6:.1f} MB ({size_mb:.1f} MiB), state {state}, processed and "
          f"acknowledged in {elapsed:.1f} s, store "
          f"{'SQLite' if not args.store else args.store.split('@')[-1]}")
    for p in procs:
        role = "gateway (SMTP intake, sender)" if p.pid == proc.pid else "worker process"
        if not args.workers:
            role = "gateway (all roles)"
        grow = (peaks[p.pid] - base[p.pid]) / 1024
        print(f"  {role:<30} ready {cold[p.pid] / 1024:6.1f} MiB, before the message "
              f"{base[p.pid] / 1024:6.1f} MiB, peak {peaks[p.pid] / 1024:6.1f}"
              f" MiB, growth {grow:6.1f} MiB = {grow / size_mb:.2f}x the message")
    if deliver:
        small_kb, big_kb = deliver
        grow = (big_kb - small_kb) / 1024
        print(f"  {'mailgw deliver':<30} peak with the small message {small_kb / 1024:6.1f} MiB,"
              f" with the big one {big_kb / 1024:6.1f} MiB, growth {grow:6.1f} MiB ="
              f" {grow / size_mb:.2f}x the message")


if __name__ == "__main__":
    main()
