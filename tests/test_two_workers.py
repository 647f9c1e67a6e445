"""Two worker processes on one store: every message processed exactly once.

On PostgreSQL the workers claim with FOR UPDATE SKIP LOCKED; on SQLite they queue on the
write lock. Either way no message may be processed twice or left behind.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import func, select

from mailgw.store import models as m
from tests.conftest import wait_until
from tests.helpers import Harness, mail

N = 400


@pytest.mark.timeout(300)
def test_two_workers_process_each_message_exactly_once(home):
    hx = Harness(home)
    # Small batches so the two workers interleave many times.
    data = home.config()
    data["worker"] = {"batch_size": 8, "poll_interval": 0.1}
    home.write_config(data)
    raws = []
    for i in range(N):
        if i % 4 == 3:  # a quarter are replies to an earlier message
            raws.append(mail(f"Re: topic {i - 3}", msgid=f"m{i}@c", In_Reply_To=f"<m{i - 3}@c>",
                             sender=f"user{(i - 3) % 50}@customer.test"))
        else:
            raws.append(mail(f"topic {i}", msgid=f"m{i}@c", sender=f"user{i % 50}@customer.test"))
    logs = [home.path / f"worker{k}.log" for k in range(2)]
    # Two worker nodes, each its own worker (--workers 0: not a pool of children each).
    procs = [subprocess.Popen([sys.executable, "-m", "mailgw", "run", "--role", "worker",
                               "--workers", "0"],
                              env=home.env(), stdout=subprocess.DEVNULL,
                              stderr=open(log, "wb")) for log in logs]  # noqa: SIM115
    try:
        # Both workers are up before the mail arrives, so both get a share of it
        wait_until(lambda: all(b"running roles" in log.read_bytes() for log in logs),
                   timeout=60, what="both workers started")
        hx.put(*raws)
        wait_until(lambda: hx.pending() == 0, timeout=240, interval=0.2, what="queue drained")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    outs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], outs
    with hx.engine.connect() as c:
        done = c.scalar(select(func.count()).select_from(m.Inbound).where(m.Inbound.state == "done"))
        per_inbound = c.execute(
            select(m.Article.inbound_id, func.count()).where(m.Article.direction == "in")
            .group_by(m.Article.inbound_id)).all()
        tickets = c.scalar(select(func.count()).select_from(m.Ticket))
        acks = c.scalar(select(func.count()).select_from(m.Outbox))
        workers = c.execute(select(m.Inbound.claimed_by, func.count())
                            .group_by(m.Inbound.claimed_by)).all()
    hx.close()
    assert done == N
    if hx.engine.dialect.name == "postgresql":
        # Both workers took part (each row records the worker that claimed it last). On
        # SQLite one worker may take everything: there is one writer, and SQLite's busy
        # handler lets the worker that just committed win the lock again.
        assert len(workers) == 2 and all(n >= 20 for _, n in workers), workers
    assert len(per_inbound) == N and all(n == 1 for _, n in per_inbound)
    assert acks == N  # one acknowledgement per message, none twice
    # Every reply threads into its original's ticket, also when the other worker holds the
    # original in its batch (the reply waits for it: docs/architecture.md decision 31).
    assert tickets == N * 3 // 4
