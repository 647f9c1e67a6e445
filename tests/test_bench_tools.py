"""The benchmark's own tools (bench/): the lighter load generator sends the gateway the same
bytes as smtplib, its sink counts acknowledgements, and bench/floor.py runs.

Speed is measured in bench/, never here."""

from __future__ import annotations

import json
import random
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select

from tests.conftest import wait_until

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from gen_corpus import generate  # noqa: E402
from lean_smtp import QUEUED, LeanSink, send_all, wire_data  # noqa: E402


def smtplib_wire(raw: bytes) -> bytes:
    """What smtplib.SMTP.data(raw) writes after the 354."""
    sent: list[bytes] = []

    class Capture(smtplib.SMTP):
        def send(self, s):  # type: ignore[no-untyped-def]
            sent.append(s if isinstance(s, bytes) else s.encode())

        def getreply(self):  # type: ignore[no-untyped-def]
            return (354, b"go") if len(sent) == 1 else (250, b"ok")

    Capture().data(raw)
    return sent[1]


TRICKY = [
    b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nlast",          # no final CRLF
    b"Subject: bare lf\n\n.line\nsecond\n",                               # bare LF kept
    b"Subject: long\r\n\r\n" + b"x" * 5000 + b"\r\n.\r\n",
    b"Subject: cr\r\n\r\nbare\rcr\r\n",
]


def test_wire_data_is_what_smtplib_sends() -> None:
    rnd = random.Random(7)
    alphabet = [b".", b"\r", b"\n", b"\r\n", b"a", b" ", b"\r\n."]
    samples = TRICKY + [b"".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 40)))
                        for _ in range(2000)]
    samples += [raw for _, raw in generate(20, 3)]
    for raw in samples:
        assert wire_data(raw) == smtplib_wire(raw), raw


def test_lean_sink_counts_acknowledgements() -> None:
    sink = LeanSink()
    sink.start()
    try:
        big = b"In-Reply-To: <big@x>\r\nSubject: big\r\n\r\n" + b".line\r\n" * 60000
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as s:
            s.ehlo()
            assert s.has_extn("size") and s.has_extn("8bitmime") and s.has_extn("smtputf8")
            s.sendmail("a@x.test", ["b@x.test"], b"In-Reply-To: <one@x>\r\n\r\nbody\r\n")
            s.sendmail("a@x.test", ["b@x.test"], b"Subject: no reply\r\n\r\n.\r\n")
            s.sendmail("a@x.test", ["b@x.test"], big)
            s.sendmail("a@x.test", ["b@x.test"], b"")
            assert s.noop()[0] == 250
        assert sink.messages == 4
        assert set(sink.acked) == {"one@x", "big@x"}
    finally:
        sink.stop()


def test_lean_and_pipelined_clients_deliver_the_same_bytes_to_mailgw(home, gateway) -> None:  # type: ignore[no-untyped-def]
    # Given a gateway whose relay is the lean sink
    sink = LeanSink()
    sink.start()
    try:
        home.update_config(relay={"host": "127.0.0.1", "port": sink.port},
                           default_queue="support")
        gateway.start()
        corpus = generate(6, 5) + [(f"tricky{k}@bench.test", raw) for k, raw in enumerate(TRICKY)]

        # When the corpus is sent by smtplib, by the lean client and by the pipelined one
        ids: dict[str, list[int]] = {"smtplib": [], "lean": [], "pipelined": []}
        with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as s:
            s.ehlo()
            for _, raw in corpus:
                s.mail("bench@customer.test")
                s.rcpt("support@example.com")
                code, resp = s.data(raw)
                assert code == 250
                ids["smtplib"].append(int(QUEUED.search(resp).group(1)))
        for mode in ("lean", "pipelined"):
            got: dict[str, int] = {}
            info = send_all("127.0.0.1", gateway.port, corpus, connections=3,
                            pipeline=mode == "pipelined",
                            on_queued=lambda mid, line, t, got=got: got.setdefault(
                                mid, int(QUEUED.search(line).group(1))))
            assert info["pipelining_advertised"] is True  # mailgw offers it (RFC 2920)
            ids[mode] = [got[mid] for mid, _ in corpus]

        # Then the gateway stored the same bytes for each message, whichever client sent it
        from mailgw.store import models as m

        engine = home.engine()
        with engine.connect() as c:
            raw_of = dict(c.execute(select(m.Inbound.id, m.Inbound.raw)).all())
        engine.dispose()
        assert len(raw_of) == 3 * len(corpus)
        for k in range(len(corpus)):
            first = bytes(raw_of[ids["smtplib"][k]])
            assert bytes(raw_of[ids["lean"][k]]) == first
            assert bytes(raw_of[ids["pipelined"][k]]) == first

        # And the generated corpus's acknowledgements reach the lean sink
        wanted = {mid for mid, _ in corpus[:6]}
        wait_until(lambda: wanted <= set(sink.acked), what="acknowledgements at the sink")
    finally:
        # The gateway first: its sender may be in the middle of a relay session (a sink
        # stopped first leaves that session unanswered)
        if gateway.proc is not None and gateway.proc.poll() is None:
            gateway.stop()
        sink.stop()


def test_floor_runs() -> None:
    proc = subprocess.run([sys.executable, str(BENCH / "floor.py"), "--count", "12",
                           "--rounds", "1", "--connections", "2", "--json"],
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    out = json.loads(proc.stdout)
    parts = {k[0] for k in out["figures"]}
    assert parts == set("abcdef")
    assert all(v["ms"] >= 0 for v in out["figures"].values())
    assert out["floor"]["gateway floor, ms a message"] > 0


def test_lean_watcher_sees_what_the_default_query_sees(tmp_path: Path) -> None:
    import sqlite3

    from smtp_bench import store_poller

    db = tmp_path / "w.db"
    c = sqlite3.connect(db, isolation_level=None)
    c.execute("CREATE TABLE inbound (id INTEGER PRIMARY KEY, raw BLOB, state TEXT)")
    c.execute("CREATE INDEX ix_inbound_state ON inbound (state)")
    states = ["done", "pending", "done", "quarantined", "pending", "done"]
    c.executemany("INSERT INTO inbound VALUES (?, ?, ?)",
                  [(i, b"x" * 5000, s) for i, s in enumerate(states, 1)])
    fetch, close = store_poller(f"sqlite:///{db}")
    try:
        for low in range(1, 8):
            default = [r[0] for r in c.execute(
                "SELECT id FROM inbound WHERE id >= ? AND state <> 'pending'", (low,))]
            assert fetch(low) == default
        c.execute("UPDATE inbound SET state = 'done' WHERE id = 2")
        c.execute("INSERT INTO inbound VALUES (7, x'00', 'pending')")
        assert fetch(1) == [1, 2, 3, 4, 6]
    finally:
        close()
        c.close()


def test_matrix_prints_a_row_per_combination() -> None:
    """bench/matrix.py runs smtp_bench.py per store/client/connections and tabulates it."""
    proc = subprocess.run([sys.executable, str(BENCH / "matrix.py"), "--stores", "sqlite",
                           "--clients", "lean", "--connections", "2,3", "--count", "12",
                           "--runs", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| SQLite |")]
    assert [row.split(" | ")[2] for row in rows] == ["2", "3"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[4].split("**")[1]) > 0  # msg/s
        assert int(cells[-3]) > 0 and cells[-1] == "0"  # tickets; nothing quarantined


def test_pg_cpu_counts_the_gateways_backends_and_not_other_sessions(store_url) -> None:  # type: ignore[no-untyped-def]
    """smtp_bench's ``pg_cpu_ms_per_msg``: the server's CPU for the gateway's connections
    (told by the ``application_name`` bench_store gives its URL), not the postmaster's or other
    sessions' on the machine, including a backend that connects after the start."""
    import pytest

    if not store_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's server processes")
    import psycopg
    from smtp_bench import BENCH_APP, PgCpu, app_name

    plain = store_url.replace("+psycopg", "").split("?", 1)[0]
    url = f"{store_url}{'&' if '?' in store_url else '?'}application_name=mailgw-t{id(plain)}"
    app = app_name(url)
    burn = "SELECT count(*) FROM generate_series(1, 2000000)"
    # Given a sampler started before anything connects
    cpu = PgCpu(url, interval=0.02)
    try:
        # When a gateway's connection, a benchmark's and another session's each work
        with psycopg.connect(plain, application_name=app) as gw, \
                psycopg.connect(plain, application_name=app + BENCH_APP) as bench, \
                psycopg.connect(plain, application_name="someone else") as other:
            for _ in range(3):
                gw.execute(burn)
                other.execute(burn)
                other.execute(burn)
            bench.execute("SELECT 1")
            time.sleep(0.1)
            kinds = [cpu.kind.get(c.info.backend_pid) for c in (gw, bench, other)]
            gw_cpu = _proc_cpu(gw.info.backend_pid)
            other_cpu = _proc_cpu(other.info.backend_pid)
            got = cpu.stop()
    finally:
        if not cpu._done.is_set():
            cpu.stop()
    # Then the gateway's backend is counted, the other session's is not
    assert kinds == ["gateway", "bench", "other"]
    assert other_cpu > 1.5 * gw_cpu > 0
    assert abs(got["gateway"] - gw_cpu) <= 0.03 + 0.1 * gw_cpu
    assert got["gateway"] + got["bench"] < gw_cpu + 0.1 * other_cpu + 0.03


def _proc_cpu(pid: int) -> float:
    import os

    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
