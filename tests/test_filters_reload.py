"""Hot reload while ``mailgw run`` receives mail over SMTP: a valid edit is picked up without a
restart (by mtime, or at once on SIGHUP); an invalid edit is logged with its error and the
last good pipeline stays in force. Invalid filters at start refuse to start."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import wait_until
from tests.test_e2e_smtp import customer_mail, send


def rules_file(home):  # type: ignore[no-untyped-def]
    return home.path / "filters" / "50-routing.yaml"


def route(home, queue: str, tag: str) -> None:  # type: ignore[no-untyped-def]
    rules_file(home).write_text(
        "rules:\n"
        "  - name: invoices\n"
        "    when: {subject: {regex: '(?i)invoice'}}\n"
        f"    then: {{queue: {queue}, tags: [{tag}]}}\n")


def ticket_for(home, subject: str) -> dict:  # type: ignore[no-untyped-def]
    """The ticket (queue, tags) once the worker made it; read from the store directly, a
    CLI process per poll would cost more than the test."""
    from sqlalchemy import select

    from mailgw.store.models import Ticket

    engine = home.engine()
    try:
        def find():  # type: ignore[no-untyped-def]
            with engine.connect() as c:
                return c.execute(select(Ticket.queue, Ticket.tags)
                                 .where(Ticket.title == subject)).first()
        queue, tags = wait_until(find, what=f"ticket {subject!r}")
    finally:
        engine.dispose()
    return {"queue": queue, "tags": tags}


def test_edits_are_picked_up_by_mtime_and_bad_edits_keep_the_last_good(home, gateway):
    home.update_config(filters_reload_interval=0.1)
    route(home, "billing", "v1")
    gateway.start()
    send(gateway.port, customer_mail("Invoice one", "x"))
    t1 = ticket_for(home, "Invoice one")
    assert (t1["queue"], t1["tags"]) == ("billing", ["v1"])

    # A valid edit: no restart, the next message follows it
    route(home, "support", "v2")
    time.sleep(0.3)  # past filters_reload_interval: the next batch looks at the files
    send(gateway.port, customer_mail("Invoice two", "x"))
    t2 = ticket_for(home, "Invoice two")
    assert (t2["queue"], t2["tags"]) == ("support", ["v2"])

    # An invalid edit: logged with file, line, rule and field; v2 stays in force
    rules_file(home).write_text(
        "rules:\n  - name: invoices\n    when: {subject: {regex: '(invoice'}}\n"
        "    then: {queue: billing, tags: [v3]}\n")
    time.sleep(0.3)
    send(gateway.port, customer_mail("Invoice three", "x"))
    t3 = ticket_for(home, "Invoice three")
    assert (t3["queue"], t3["tags"]) == ("support", ["v2"])
    wait_until(lambda: "edit refused" in gateway.output(), what="the refused edit in the log")
    assert "50-routing.yaml:3: rule 'invoices': when.subject.regex: bad regex" in gateway.output()

    # Fixed again: picked up
    route(home, "billing", "v4")
    time.sleep(0.3)
    send(gateway.port, customer_mail("Invoice four", "x"))
    t4 = ticket_for(home, "Invoice four")
    assert (t4["queue"], t4["tags"]) == ("billing", ["v4"])
    assert gateway.proc.poll() is None


@pytest.mark.parametrize("workers", [0, 1], ids=["thread", "worker-process"])
def test_sighup_reloads_at_once(home, gateway, workers):
    """SIGHUP reloads at once; with --workers the gateway passes it on to its worker
    processes, which then log their own reload."""
    home.update_config(filters_reload_interval=3600)  # no mtime check within the test
    route(home, "billing", "before")
    gateway.start("--workers", str(workers))
    send(gateway.port, customer_mail("Invoice A", "x"))
    assert ticket_for(home, "Invoice A")["tags"] == ["before"]
    route(home, "support", "after")
    send(gateway.port, customer_mail("Invoice B", "x"))
    assert ticket_for(home, "Invoice B")["tags"] == ["before"]  # not checked yet
    # Loaded once at start by each process holding a pipeline, then once more on SIGHUP.
    # Counted before the signal: a reload logged at once must not be counted as a start.
    loads = gateway.output().count("filters: loaded")
    gateway.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: gateway.output().count("filters: loaded") >= loads + 1 + workers,
               what="the reload in the log of every process")
    send(gateway.port, customer_mail("Invoice C", "x"))
    t = ticket_for(home, "Invoice C")
    assert (t["queue"], t["tags"]) == ("support", ["after"])


def test_invalid_filters_refuse_to_start(home):
    rules_file(home).write_text("rules:\n  - name: r\n    then: {queue: nowhere}\n")
    proc = subprocess.run([sys.executable, "-m", "mailgw", "run", "--smtp", "127.0.0.1:1"],
                          capture_output=True, env=home.env(), timeout=60)
    assert proc.returncode == 78
    assert "filters error:" in proc.stderr.decode()
    assert "50-routing.yaml:3: rule 'r': then.queue: unknown queue 'nowhere'" in \
        proc.stderr.decode()
