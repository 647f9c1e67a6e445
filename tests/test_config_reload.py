"""SIGHUP reloads config/mailgw.yaml in a running ``mailgw run``: a valid config is put in
force without a restart (a new queue takes mail at once, in the gateway and in its worker
processes); an invalid one, or one the filters no longer compile against, is logged with
file, line and reason and the running config stays in force; settings read only at start
say so."""

from __future__ import annotations

import signal
import smtplib

import pytest

from tests.conftest import wait_until
from tests.test_e2e_smtp import customer_mail, send
from tests.test_filters_reload import ticket_for


def rcpt_code(port: int, address: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo()
        s.mail("alice@customer.test")
        code, _ = s.rcpt(address)
        s.rset()
        return code


def hup_and_wait(gateway, text: str, processes: int) -> None:  # type: ignore[no-untyped-def]
    before = gateway.output().count(text)
    gateway.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: gateway.output().count(text) >= before + processes,
               what=f"{text!r} in the log of {processes} process(es)")


@pytest.mark.parametrize("workers", [0, 1], ids=["thread", "worker-process"])
def test_sighup_puts_a_valid_config_in_force_and_keeps_it_against_a_bad_one(
        home, gateway, workers):
    gateway.start("--workers", str(workers))
    assert rcpt_code(gateway.port, "sales@example.com") == 550  # no such queue yet

    data = home.config()
    data["queues"].append({"name": "sales", "addresses": ["sales@example.com"],
                           "sender_name": "Example Sales"})
    home.write_config(data)
    hup_and_wait(gateway, "config: reloaded", 1 + workers)
    assert rcpt_code(gateway.port, "sales@example.com") == 250
    send(gateway.port, customer_mail("Quote please", "x", to="sales@example.com"))
    assert ticket_for(home, "Quote please")["queue"] == "sales"  # the worker knows it too

    # A broken config: refused with file, line and reason; the running one stays.
    data["queues"][-1]["auto_response"] = "sometimes"
    home.write_config(data)
    hup_and_wait(gateway, "refused, keeping the running config", 1 + workers)
    [line] = [ln for ln in gateway.output().splitlines()
              if "config/mailgw.yaml:" in ln and "auto_response" in ln][:1]
    assert "queues[2].auto_response: Input should be a valid boolean" in line, line
    assert rcpt_code(gateway.port, "sales@example.com") == 250
    send(gateway.port, customer_mail("Second quote", "x", to="sales@example.com"))
    assert ticket_for(home, "Second quote")["queue"] == "sales"
    assert gateway.proc.poll() is None


def test_a_config_the_filters_do_not_compile_against_is_refused(home, gateway):
    (home.path / "filters" / "50-routing.yaml").write_text(
        "rules:\n  - name: to-billing\n    when: {subject: {regex: '(?i)invoice'}}\n"
        "    then: {queue: billing}\n")
    gateway.start()
    data = home.config()
    data["queues"] = [q for q in data["queues"] if q["name"] != "billing"]
    home.write_config(data)
    hup_and_wait(gateway, "refused, keeping the running config", 1)
    assert "50-routing.yaml:4: rule 'to-billing': then.queue: unknown queue 'billing'" in \
        gateway.output()
    send(gateway.port, customer_mail("Invoice 7", "x"))
    assert ticket_for(home, "Invoice 7")["queue"] == "billing"  # old config and rules


def test_settings_read_at_start_say_they_need_a_restart(home, gateway):
    gateway.start()
    data = home.config()
    data["smtp"]["max_message_size"] = 1000
    data["relay"] = {"host": "127.0.0.1", "port": 2599}
    home.write_config(data)
    hup_and_wait(gateway, "config: reloaded", 1)
    out = gateway.output()
    assert "config: relay changed; it takes effect when mailgw run restarts" in out
    assert "config: smtp changed; it takes effect when mailgw run restarts" in out


def test_sighup_reads_edited_templates(home, gateway, sink):
    """Templates are compiled once and cached; SIGHUP makes the next mail use the edit."""
    home.update_config(relay={"host": "127.0.0.1", "port": sink.port})
    gateway.start()
    send(gateway.port, customer_mail("First", "x"))
    [ack] = sink.wait_for(1)
    assert "We got it, promise" not in ack.get_payload()
    path = home.path / "templates" / "ack_new.j2"
    path.write_text(path.read_text().replace("{% block body %}",
                                             "{% block body %}We got it, promise.\n", 1))
    hup_and_wait(gateway, "filters: loaded", 1)  # the end of the reload (config unchanged)
    send(gateway.port, customer_mail("Second", "x"))
    second = sink.wait_for(2)[1]
    assert second.get_payload().startswith("We got it, promise.")


def _catches_sighup(pid: int) -> bool:
    try:
        status = open(f"/proc/{pid}/status").read()  # noqa: SIM115
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGHUP - 1)))


def test_sighup_while_starting_is_recorded_and_reloads_once_ready(home, gateway):
    """A SIGHUP that arrives before the gateway serves (a logrotate while it starts) used to
    kill it: SIGHUP's default action. It is now caught from the first line of ``mailgw run``
    and carried out once the gateway is ready."""
    import subprocess
    import sys
    import time

    gateway.log = home.path / "early-hup.log"
    out = open(gateway.log, "wb")  # noqa: SIM115 - handed to the child process
    gateway.proc = subprocess.Popen(
        # The worker as a thread: the subject is the gateway process's own handling (a worker
        # process would log its own reload of the SIGHUP passed on to it).
        [sys.executable, "-m", "mailgw", "run", "--smtp", f"127.0.0.1:{gateway.port}",
         "--workers", "0"],
        stdout=out, stderr=subprocess.STDOUT, env=home.env())
    wait_until(lambda: _catches_sighup(gateway.proc.pid) or gateway.proc.poll() is not None,
               what="the gateway to catch SIGHUP")
    assert "mailgw: ready" not in gateway.output(), "SIGHUP is caught only once ready"
    gateway.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "mailgw: ready" in gateway.output() or gateway.proc.poll() is not None,
               what="the gateway to be ready")
    assert gateway.proc.poll() is None, f"gateway died of SIGHUP:\n{gateway.output()}"
    wait_until(lambda: "config: " in gateway.output() and "unchanged" in gateway.output(),
               what="the deferred reload in the log")
    time.sleep(0.2)
    assert gateway.output().count("unchanged") == 1  # carried out once
