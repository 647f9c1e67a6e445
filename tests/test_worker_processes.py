"""How many worker processes ``mailgw run`` starts: ``--workers N|auto`` and the config's
``worker.processes`` (default ``auto``: docs/architecture.md decision 39)."""

from __future__ import annotations

import re
import smtplib

import pytest
from sqlalchemy import select

from tests.conftest import wait_until
from tests.helpers import mail


@pytest.mark.parametrize(("setting", "sqlite", "cores", "expected"), [
    ("auto", True, 1, 0),      # one core: the worker is a thread, no second interpreter
    ("auto", True, 2, 1),      # SQLite: one writer; one process beside the gateway
    ("auto", True, 16, 1),
    ("auto", False, 1, 0),
    ("auto", False, 2, 1),     # PostgreSQL: a core each beside the gateway's
    ("auto", False, 4, 3),
    ("auto", False, 64, 8),    # at most 8
    (0, False, 16, 0),         # a number is taken as it is
    (3, True, 2, 3),
])
def test_worker_processes_resolves_auto_by_cores_and_store(setting, sqlite, cores, expected):
    from mailgw.settings import worker_processes

    assert worker_processes(setting, sqlite=sqlite, cores=cores) == expected


def test_usable_cores_follows_the_affinity_mask():
    import os

    from mailgw.settings import usable_cores

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert usable_cores() == 1
    finally:
        os.sched_setaffinity(0, before)
    assert usable_cores() == len(before)


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("max 100000\n", 64),            # no quota: the affinity mask's count
    ("100000 100000\n", 1),          # docker --cpus 1
    ("150000 100000\n", 2),          # 1.5 CPUs: rounded up
    ("50000 100000\n", 1),           # half a CPU: still one
    ("800000 100000\n", 8),
    ("garbage\n", 64),
])
def test_usable_cores_is_bounded_by_the_cgroup_quota(tmp_path, monkeypatch, cpu_max, expected):
    import os

    from mailgw.settings import usable_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    f = tmp_path / "cpu.max"
    f.write_text(cpu_max)
    assert usable_cores(f) == expected
    assert usable_cores(tmp_path / "missing") == 64


def test_a_bad_processes_setting_is_refused_with_its_path(home):
    home.update_config(worker={"processes": 65})
    proc = home.cli("config", "check")
    assert proc.returncode != 0
    err = (proc.stdout + proc.stderr).decode()
    # One line, naming the path and what is allowed (not one line per branch of the type).
    lines = [ln for ln in err.splitlines() if "worker.processes" in ln]
    assert len(lines) == 1, err
    assert "processes must be a number from 0 to 64, or 'auto'" in lines[0]


@pytest.mark.parametrize("value", ["x", "2", True, -1, 1.5])
def test_processes_takes_only_a_number_or_auto(value):
    from pydantic import ValidationError

    from mailgw.settings import Worker

    with pytest.raises(ValidationError) as exc:
        Worker(processes=value)
    assert exc.value.error_count() == 1


def test_a_bad_workers_option_is_refused(home):
    proc = home.cli("run", "--workers", "many")
    assert proc.returncode == 2
    assert "'many': processes must be a number from 0 to 64, or 'auto'" in proc.stderr.decode()


def _started(gateway) -> list[int]:  # type: ignore[no-untyped-def]
    return [int(p) for p in re.findall(r"worker process \d+ started \(pid (\d+)\)",
                                       gateway.output())]


def _process_one(home, gateway) -> str:  # type: ignore[no-untyped-def]
    """Send one message; return the ``claimed_by`` of its inbound row once it is done."""
    from mailgw.store import models as m

    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as s:
        s.sendmail("alice@customer.test", ["support@example.com"],
                   mail("printer on fire", msgid="p1@customer.test"))
    engine = home.engine()
    try:
        def done():  # type: ignore[no-untyped-def]
            with engine.connect() as c:
                return c.execute(select(m.Inbound.state, m.Inbound.claimed_by)).first()

        row = wait_until(lambda: (r := done()) and r.state == "done" and r, timeout=60,
                         what="message processed")
        return row.claimed_by
    finally:
        engine.dispose()


def test_run_by_default_processes_mail_in_a_worker_process(home, gateway):
    """With nothing said (``auto``) on this machine's cores: one worker process on SQLite
    and on PostgreSQL alike on two cores; the mail is processed there, not in the gateway."""
    from mailgw.settings import usable_cores

    if usable_cores() < 2:
        pytest.skip("auto runs the worker as a thread on one core")
    gateway.start(workers=None)  # no --workers: mailgw run's own default
    pids = _started(gateway)
    sqlite = home.store_url.startswith("sqlite")
    assert len(pids) == (1 if sqlite else min(usable_cores() - 1, 8))
    claimed_by = _process_one(home, gateway)
    assert int(claimed_by.rsplit(":", 1)[1]) in pids
    assert gateway.stop() == 0


@pytest.mark.parametrize("how", ["option", "config"])
def test_zero_runs_the_worker_as_a_thread(home, gateway, how):
    if how == "config":
        home.update_config(worker={"processes": 0})
        gateway.start(workers=None)  # the config's, no --workers
    else:
        home.update_config(worker={"processes": 2})  # the option wins over the config
        gateway.start("--workers", "0", workers=None)
    assert _started(gateway) == []
    claimed_by = _process_one(home, gateway)
    assert int(claimed_by.rsplit(":", 1)[1]) == gateway.proc.pid
    assert gateway.stop() == 0
