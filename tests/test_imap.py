"""IMAP intake against a real Dovecot on loopback (tests/imap_server.py): the poller, the
ledger and the after-actions, driven in-process; the gateway role in test_imap_gateway.py."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgw.intake import ledger
from mailgw.intake.imap import Poller, connect
from mailgw.store import models as m
from tests.conftest import wait_until
from tests.helpers import Harness, mail


def setup(home, imap_user, **over):  # type: ignore[no-untyped-def]
    home.update_config(mailboxes=[imap_user.mailbox_config(**over)])
    h = Harness(home)
    mb = h.settings.mailboxes[0]
    return h, Poller(h.engine, mb, home.path, threading.Event())


def poll(p: Poller) -> int:
    assert ledger.acquire_lease(p.engine, p.mb.name, p.me, p.lease) is None
    client = connect(p.mb, p.creds)
    try:
        return p.poll_once(client)
    finally:
        client.logout()


def status_of(h: Harness) -> dict:
    rows = ledger.mailbox_statuses(h.engine)
    return rows[0] if rows else {}


def ledger_rows(h: Harness) -> list[m.ImapMessage]:
    with Session(h.engine) as s:
        return list(s.scalars(select(m.ImapMessage).order_by(m.ImapMessage.id)))


def test_inbox_mail_becomes_tickets_moved_to_processed_and_ledgered(home, imap_user):
    # Given three customer mails in INBOX
    raws = [mail(f"Printer {i} broken", sender=f"c{i}@customer.test", msgid=f"p{i}@customer.test")
            for i in range(3)]
    imap_user.append(*raws)
    h, p = setup(home, imap_user)
    with imap_user.client() as c:
        assert not c.folder_exists("Processed")
    # When the poller reads the mailbox and the worker runs
    assert poll(p) == 3
    h.drain()
    # Then each is a ticket in the mailbox's queue, INBOX is empty, Processed (created) has them
    assert sorted(t.title for t in h.tickets()) == [f"Printer {i} broken" for i in range(3)]
    assert {t.queue for t in h.tickets()} == {"support"}
    assert imap_user.uids("INBOX") == []
    assert len(imap_user.uids("Processed")) == 3
    rows = ledger_rows(h)
    assert [(r.status, r.action_done) for r in rows] == [("queued", True)] * 3
    assert {r.message_id for r in rows} == {f"p{i}@customer.test" for i in range(3)}
    with Session(h.engine) as s:
        inbound = s.scalars(select(m.Inbound).order_by(m.Inbound.id)).all()
        assert [i.raw for i in inbound] == raws  # the exact bytes, as fetched
        assert all(i.source == "imap" and i.source_ref.startswith(f"{p.mb.name}/INBOX/")
                   for i in inbound)
        # (the Message-ID read at intake: a reply waits for its original, decision 31)
        assert [i.message_id for i in inbound] == [f"p{k}@customer.test" for k in range(3)]
    # And a second poll finds nothing new
    assert poll(p) == 0
    assert len(h.tickets()) == 3
    h.close()


def test_same_bytes_twice_make_one_ticket(home, imap_user):
    raw = mail("Same twice", msgid="twice@customer.test")
    imap_user.append(raw, raw)
    h, p = setup(home, imap_user)
    assert poll(p) == 1
    imap_user.append(raw)  # and once more, in a later poll
    assert poll(p) == 0
    h.drain()
    assert len(h.tickets()) == 1
    assert [r.status for r in ledger_rows(h)] == ["queued", "duplicate", "duplicate"]
    first = ledger_rows(h)[0].inbound_id
    assert {r.inbound_id for r in ledger_rows(h)} == {first}
    dups = h.events("imap_duplicate")
    assert len(dups) == 2 and all(e.inbound_id == first for e in dups)
    # Every copy is taken off the INBOX: nothing is left to be fetched again.
    assert imap_user.uids("INBOX") == [] and len(imap_user.uids("Processed")) == 3
    h.close()


def test_different_message_with_same_message_id_is_kept_and_logged(home, imap_user):
    a = mail("Original", body="first text", msgid="reused@customer.test")
    b = mail("Impostor", body="other text", msgid="reused@customer.test")
    imap_user.append(a)
    h, p = setup(home, imap_user)
    assert poll(p) == 1
    imap_user.append(b)
    assert poll(p) == 1
    h.drain()
    subjects = sorted(a.subject for a in h.articles() if a.direction == "in")
    assert subjects == ["Impostor", "Original"]
    events = h.events("imap_message_id_reused")
    assert len(events) == 1
    e = events[0]
    assert e.data["message_id"] == "reused@customer.test"
    assert e.data["earlier_inbound_id"] == ledger_rows(h)[0].inbound_id
    assert e.inbound_id == ledger_rows(h)[1].inbound_id != e.data["earlier_inbound_id"]
    h.close()


def test_uidvalidity_change_does_not_reimport(home, imap_user):
    # Given a folder read once (flag mode keeps the messages there)
    with imap_user.client() as c:
        c.create_folder("Support")
    a = mail("Alpha", msgid="alpha@customer.test", Date="Thu, 26 Nov 2026 10:00:00 +0000")
    b = mail("Beta", msgid="beta@customer.test", Date="Thu, 26 Nov 2026 10:05:00 +0000")
    imap_user.append(a, b, folder="Support")
    h, p = setup(home, imap_user, folders=["Support"], after="flag")
    assert poll(p) == 2
    old_uv = ledger.folder_state(h.engine, p.mb.name, "Support")[0]
    # When the server rebuilds the folder (new UIDVALIDITY): the same bytes of Alpha, Beta
    # with a header rewritten, and one genuinely new message
    with imap_user.client() as c:
        c.delete_folder("Support")
        c.create_folder("Support")
    b_rewritten = b.replace(b"Subject: Beta", b"X-Rebuilt: yes\r\nSubject: Beta")
    new = mail("Gamma", msgid="gamma@customer.test")
    imap_user.append(a, b_rewritten, new, folder="Support")
    # Then only the new one is queued
    assert poll(p) == 1
    new_uv = ledger.folder_state(h.engine, p.mb.name, "Support")[0]
    assert new_uv != old_uv
    h.drain()
    assert sorted(t.title for t in h.tickets()) == ["Alpha", "Beta", "Gamma"]
    statuses = [(r.uidvalidity, r.status) for r in ledger_rows(h)]
    assert statuses == [(old_uv, "queued")] * 2 + [(new_uv, "duplicate"), (new_uv, "known"),
                                                   (new_uv, "queued")]
    assert len(h.events("imap_uidvalidity_changed")) == 1
    assert len(h.events("imap_known_after_uidvalidity_change")) == 1
    h.close()


@pytest.mark.parametrize("after", ["flag", "delete"])
def test_after_action_flag_or_delete(home, imap_user, after):
    imap_user.append(mail("One"), mail("Two"))
    # Reading alone changes nothing on the server (BODY.PEEK): still unseen before the action.
    h, p = setup(home, imap_user, after=after)
    assert poll(p) == 2
    with imap_user.client() as c:
        assert not c.folder_exists("Processed")
        c.select_folder("INBOX", readonly=True)
        if after == "flag":
            assert len(c.search("SEEN")) == 2 and c.search("UNSEEN") == []
        else:
            assert c.search("ALL") == []
    assert poll(p) == 0
    assert len(ledger_rows(h)) == 2
    h.close()


def test_large_first_run_reads_in_batches_and_shows_progress(home, imap_user, caplog):
    n = 230
    with imap_user.client() as c:
        for i in range(n):
            c.append("INBOX", mail(f"bulk {i}", msgid=f"bulk{i}@customer.test"))
    h, p = setup(home, imap_user, batch_size=40, after="flag")
    with caplog.at_level(logging.INFO, logger="mailgw.intake.imap"):
        assert poll(p) == n
    progress = [r.getMessage() for r in caplog.records if "messages read" in r.getMessage()]
    assert f"{n} messages to read" in caplog.text
    assert len(progress) == 6 and progress[-1].endswith(f"{n} of {n} messages read")
    assert len(ledger_rows(h)) == n
    assert h.pending() == n
    h.close()


def test_commit_refused_without_the_lease(home, imap_user):
    # A poller whose lease was taken over commits nothing (the fence in commit_batch).
    imap_user.append(mail("Fenced"))
    h, p = setup(home, imap_user)
    other = ledger.holder_id()
    assert ledger.acquire_lease(h.engine, p.mb.name, other, 60) is None
    assert ledger.acquire_lease(h.engine, p.mb.name, p.me, 60) == other
    client = connect(p.mb, p.creds)
    try:
        with pytest.raises(ledger.LeaseLost):
            p.poll_once(client)
    finally:
        client.logout()
    assert h.pending() == 0 and ledger_rows(h) == []
    assert imap_user.uids("INBOX") == [1]  # untouched
    h.close()


class Proxy:
    """A TCP proxy in front of Dovecot that can cut every connection (a network failure)."""

    def __init__(self, port: int):
        import socket

        self.target = port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conns: list = []
        self.refuse = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                down, _ = self.server.accept()
            except OSError:
                return
            if self.refuse:
                down.close()
                continue
            up = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:  # type: ignore[no-untyped-def]
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.close()
            except OSError:
                pass

    def cut(self) -> None:
        import socket

        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conns = []

    def close(self) -> None:
        self.server.close()
        self.cut()


def test_network_failure_reconnects_with_backoff_and_loses_nothing(home, imap_user):
    proxy = Proxy(imap_user.server.port)
    h, p = setup(home, imap_user, port=proxy.port, poll_interval=0.5, timeout=10)
    t = threading.Thread(target=p.run)
    t.start()
    try:
        imap_user.append(mail("Before the cut"))
        wait_until(lambda: h.pending() == 1, what="first message")
        # The network fails (while the poller waits in IDLE) and stays down for a while.
        proxy.refuse = True
        proxy.cut()
        imap_user.append(mail("During the cut"))
        wait_until(lambda: status_of(h).get("last_error"), what="the failure recorded")
        err = status_of(h)["last_error"]
        assert err.startswith(f"mailbox {p.mb.name}: ")
        time.sleep(1.5)
        assert h.pending() == 1
        # It comes back: the poller reconnects by itself and takes the mail in.
        proxy.refuse = False
        wait_until(lambda: h.pending() == 2, timeout=30, what="reconnect")
        wait_until(lambda: status_of(h).get("last_error", 1) is None,
                   what="error cleared after a good poll")
    finally:
        p.stop.set()
        t.join(30)
        proxy.close()
    assert not t.is_alive()
    assert len(ledger_rows(h)) == 2 and imap_user.uids("INBOX") == []
    h.close()


def test_a_missing_folder_is_reported_and_the_others_are_read(home, imap_user):
    imap_user.append(mail("Still read"))
    h, p = setup(home, imap_user, folders=["INBOX", "Gone"])
    assert poll(p) == 1
    assert p.folder_errors and p.folder_errors[0].startswith(f"mailbox {p.mb.name} folder Gone: ")
    assert "Mailbox doesn't exist: Gone" in p.folder_errors[0]
    assert imap_user.uids("INBOX") == []
    h.close()


@pytest.mark.parametrize("idle", [True, False])
def test_poller_stops_promptly_and_releases_its_lease(home, imap_user, idle):
    h, p = setup(home, imap_user, poll_interval=120, idle=idle)
    t = threading.Thread(target=p.run)
    t.start()
    try:
        wait_until(lambda: status_of(h).get("last_ok_at"), what="first poll")
        assert status_of(h)["poller"] == p.me
        started = time.monotonic()
        p.stop.set()
        t.join(30)
        assert not t.is_alive() and time.monotonic() - started < 5
    finally:
        p.stop.set()
        t.join(30)
    assert status_of(h)["poller"] is None
    h.close()


def test_a_uid_the_server_did_not_return_is_looked_for_again(home, imap_user):
    # The server's FETCH answer lacks UID 2 once (as when a message is expunged or briefly
    # unavailable between SEARCH and FETCH): the folder's last UID must not pass it.
    imap_user.append(mail("A"), mail("B"), mail("C"))
    h, p = setup(home, imap_user, after="flag")
    real, dropped = p._fetch, []

    def fetch_without_uid_2_once(client, uids):  # type: ignore[no-untyped-def]
        got = real(client, uids)
        if not dropped:
            dropped.append(2)
            return [f for f in got if f.uid != 2]
        return got

    p._fetch = fetch_without_uid_2_once  # type: ignore[method-assign]
    assert poll(p) == 2
    assert ledger.folder_state(h.engine, p.mb.name, "INBOX")[1] == 1
    assert poll(p) == 1
    assert sorted(r.uid for r in ledger_rows(h)) == [1, 2, 3]
    assert ledger.folder_state(h.engine, p.mb.name, "INBOX")[1] == 3
    assert poll(p) == 0
    h.close()
