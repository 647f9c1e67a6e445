"""IMAP intake inside ``mailgw run`` (the ``imap`` role) against the test Dovecot: IDLE,
crashes at the worst moments, two gateways on one mailbox, and what the admin sees."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import func, select

from mailgw.store import models as m
from tests.conftest import Gateway, free_port, wait_until
from tests.helpers import Harness, mail

ROLES = ("--role", "imap", "--role", "worker")


def count(home, model, *where) -> int:  # type: ignore[no-untyped-def]
    engine = home.engine()
    try:
        with engine.connect() as c:
            return c.execute(select(func.count()).select_from(model).where(*where)).scalar()
    finally:
        engine.dispose()


def status(home) -> dict:  # type: ignore[no-untyped-def]
    proc = home.cli("status", "--json", check=True)
    return json.loads(proc.stdout)


def box(home) -> dict:  # type: ignore[no-untyped-def]
    """The first mailbox's status row, read in-process (cheaper than the CLI in a loop)."""
    from mailgw.intake.ledger import mailbox_statuses

    engine = home.engine()
    try:
        rows = mailbox_statuses(engine)
    finally:
        engine.dispose()
    return rows[0] if rows else {}


def test_idle_picks_new_mail_up_within_seconds(home, imap_user, gateway):
    # Polling every 5 minutes: only IDLE can explain a ticket within seconds.
    home.update_config(mailboxes=[imap_user.mailbox_config(poll_interval=300)])
    gateway.start(*ROLES)
    wait_until(lambda: box(home).get("last_ok_at"), what="first poll")
    time.sleep(0.5)  # let the poller enter IDLE
    sent = time.monotonic()
    imap_user.append(mail("Idle test", msgid="idle@customer.test"))
    wait_until(lambda: count(home, m.Ticket) == 1, timeout=20, interval=0.1, what="ticket")
    elapsed = time.monotonic() - sent
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert imap_user.uids("INBOX") == [] and len(imap_user.uids("Processed")) == 1
    s = status(home)["mailboxes"][0]
    assert s["ingested"] == 1 and s["ledger"] == 1 and s["last_error"] is None
    assert s["poller"]  # the running gateway holds the lease
    assert gateway.stop() == 0
    assert box(home)["poller"] is None  # released on a clean stop


@pytest.mark.parametrize("failpoint", ["after_fetch", "after_commit"])
def test_killed_between_fetch_and_commit_ingests_each_message_once(home, imap_user, failpoint,
                                                                   monkeypatch):
    raws = [mail(f"Crash {i}", msgid=f"crash{i}@customer.test") for i in range(5)]
    imap_user.append(*raws)
    home.update_config(mailboxes=[imap_user.mailbox_config(poll_interval=1, batch_size=5)])
    # Given a gateway that dies (SIGKILL) right after fetching, or right after committing
    monkeypatch.setenv("MAILGW_IMAP_FAILPOINT", failpoint)
    proc = subprocess.Popen([sys.executable, "-m", "mailgw", "run", "--role", "imap"],
                            env=home.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, out.decode(errors="replace")
    queued = count(home, m.Inbound)
    if failpoint == "after_fetch":
        # Nothing committed and nothing changed on the server (BODY.PEEK: still unseen).
        assert queued == 0 and count(home, m.ImapMessage) == 0
        with imap_user.client() as c:
            c.select_folder("INBOX", readonly=True)
            assert len(c.search("UNSEEN")) == 5
    else:
        # Committed, but the messages are still in INBOX: the move had not happened.
        assert queued == 5 and len(imap_user.uids("INBOX")) == 5
    # When the gateway is restarted
    monkeypatch.delenv("MAILGW_IMAP_FAILPOINT")
    gw = Gateway(home, free_port()).start(*ROLES)
    try:
        wait_until(lambda: count(home, m.Ticket) == 5 and imap_user.uids("INBOX") == [],
                   timeout=30, what="all five processed and moved")
    finally:
        assert gw.stop() == 0
    # Then every message was ingested exactly once
    assert count(home, m.Inbound) == 5
    assert count(home, m.Ticket) == 5
    assert count(home, m.ImapMessage) == 5
    assert count(home, m.ImapMessage, m.ImapMessage.action_done.is_(False)) == 0
    assert len(imap_user.uids("Processed")) == 5


def test_two_gateways_on_one_mailbox_ingest_nothing_twice(home, imap_user):
    # Two IMAP-only gateways (a worker killed with them would hold its claims for the worker
    # lease; that is the worker's business, not this test's).
    home.update_config(mailboxes=[imap_user.mailbox_config(poll_interval=1, batch_size=3)])
    gws = [Gateway(home, free_port()).start("--role", "imap") for _ in range(2)]
    try:
        # Mail arrives while both run; the one reading the mailbox is killed half-way through.
        with imap_user.client() as c:
            for i in range(12):
                c.append("INBOX", mail(f"Race {i}", msgid=f"race{i}@customer.test"))
        wait_until(lambda: count(home, m.Inbound) >= 3, what="some mail taken in")
        holder = box(home)["poller"]
        assert holder is not None
        victim = next(g for g in gws if g.proc.pid == int(holder.split(":")[1]))
        victim.kill()
        with imap_user.client() as c:
            for i in range(12, 20):
                c.append("INBOX", mail(f"Race {i}", msgid=f"race{i}@customer.test"))
        try:
            wait_until(lambda: count(home, m.Inbound) == 20 and imap_user.uids("INBOX") == [],
                       timeout=60, what="all 20 taken in by the survivor")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n" + "\n---\n".join(g.output() for g in gws)) from None
        survivor = next(g for g in gws if g is not victim)
        assert box(home)["poller"].split(":")[1] == str(survivor.proc.pid)
    finally:
        for g in gws:
            if g.proc.poll() is None:
                g.stop()
    assert count(home, m.Inbound) == 20
    assert count(home, m.ImapMessage) == 20
    h = Harness(home)
    h.drain()
    assert sorted(t.title for t in h.tickets()) == sorted(f"Race {i}" for i in range(20))
    h.close()
    assert len(imap_user.uids("Processed")) == 20


def test_wrong_password_check_fails_naming_mailbox_and_server_answer(home, imap_user, gateway):
    good = imap_user.mailbox_config()
    bad = imap_user.mailbox_config(name="helpdesk-bad", password="wrong")
    home.update_config(mailboxes=[good, bad])
    imap_user.append(mail("Counted"))
    proc = home.cli("mailboxes", "check")
    assert proc.returncode == 1
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert f"{good['name']}: logged in to" in out
    assert "folder INBOX: 1 messages" in out and "IDLE" in out
    assert (f"helpdesk-bad: FAILED: mailbox helpdesk-bad: LOGIN as {imap_user.name} on "
            f"127.0.0.1:{imap_user.server.port} refused: "
            "[AUTHENTICATIONFAILED] Authentication failed.\n") in err
    assert good["name"] + ": FAILED" not in err
    # The same failure in a running gateway is loud in its log and in `mailgw status`.
    home.update_config(mailboxes=[bad])
    gateway.start(*ROLES)
    wait_until(lambda: box(home).get("last_error"), what="error in status")
    s = box(home)
    assert "helpdesk-bad" in s["last_error"] and "AUTHENTICATIONFAILED" in s["last_error"]
    assert s["last_ok_at"] is None
    text = home.cli("status", check=True).stdout.decode()
    assert "mailbox helpdesk-bad" in text and "ERROR" in text and "AUTHENTICATIONFAILED" in text
    wait_until(lambda: "AUTHENTICATIONFAILED" in gateway.output(), what="error in the log")
    assert "ERROR" in gateway.output()
