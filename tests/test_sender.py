"""The outbox sender against a real SMTP sink: retries with backoff, dead letters, no relay."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from mailgw.outbound.sender import Sender
from mailgw.queue import now
from mailgw.settings import Relay
from mailgw.settings import Sender as SenderCfg
from mailgw.store import models as m
from tests.helpers import Harness, mail


@pytest.fixture
def hx(home):  # type: ignore[no-untyped-def]
    h = Harness(home)
    h.put(mail("Need help", msgid="n@c"))
    h.drain()
    yield h
    h.close()


def _sender(hx: Harness, port: int, **cfg) -> Sender:  # type: ignore[no-untyped-def]
    return Sender(hx.engine, Relay(host="127.0.0.1", port=port, timeout=5),
                  hx.home.path / "store" / "outbox",
                  SenderCfg(backoff_initial=30, backoff_max=600, **cfg))


def _make_due(hx: Harness) -> None:
    with hx.engine.begin() as c:
        c.execute(update(m.Outbox).values(next_attempt_at=now() - timedelta(seconds=1)))


def test_temporary_refusal_is_retried_with_backoff_then_sent(hx, sink):
    sink.refusals = ["451 4.3.0 try later", "421 4.3.2 shutting down"]
    sender = _sender(hx, sink.port)
    assert sender.run_once() == 1
    [row] = hx.outbox()
    assert (row.state, row.attempts) == ("pending", 1)
    assert "451" in row.last_error
    delay = (row.next_attempt_at.replace(tzinfo=None) - now().replace(tzinfo=None)).total_seconds()
    assert 20 < delay <= 30  # first backoff step
    assert sender.run_once() == 0  # not due yet: nothing is sent early
    _make_due(hx)
    sender.run_once()
    [row] = hx.outbox()
    assert row.attempts == 2
    delay = (row.next_attempt_at.replace(tzinfo=None) - now().replace(tzinfo=None)).total_seconds()
    assert 50 < delay <= 60  # doubled
    _make_due(hx)
    sender.run_once()
    [row] = hx.outbox()
    assert (row.state, row.attempts) == ("sent", 3)
    assert len(sink.messages) == 1
    out = [a for a in hx.articles() if a.direction == "out"][0]
    assert out.delivery_state == "sent"


def test_permanent_refusal_is_a_dead_letter_and_marks_the_article(hx, sink):
    sink.refusals = ["550 5.1.1 no such user"]
    _sender(hx, sink.port).run_once()
    [row] = hx.outbox()
    assert row.state == "dead" and "550" in row.last_error
    out = [a for a in hx.articles() if a.direction == "out"][0]
    assert out.delivery_state == "failed"
    assert len(hx.events("delivery_failed")) == 1


def test_attempts_run_out_into_a_dead_letter(hx, sink):
    sink.refusals = ["451 4.3.0 busy"] * 3
    sender = _sender(hx, sink.port, max_attempts=3)
    for _ in range(3):
        _make_due(hx)
        sender.run_once()
    [row] = hx.outbox()
    assert (row.state, row.attempts) == ("dead", 3)
    assert sink.messages == []


def test_unreachable_relay_is_retried(hx):
    from tests.conftest import free_port

    _sender(hx, free_port()).run_once()
    [row] = hx.outbox()
    assert row.state == "pending" and row.attempts == 1
    assert "Connection refused" in row.last_error or "Errno" in row.last_error


def test_no_relay_writes_eml_files_atomically(hx):
    outdir = hx.home.path / "store" / "outbox"
    Sender(hx.engine, None, outdir, SenderCfg()).run_once()
    [f] = list(outdir.glob("*.eml"))
    assert not list(outdir.glob("*.tmp"))
    [row] = hx.outbox()
    assert row.state == "sent"
    assert f.read_bytes() == row.raw


def test_relay_that_never_answers_costs_one_attempt_not_one_per_mail(hx):
    import socket

    # Given three more acknowledgements queued and a relay that accepts TCP but never greets
    hx.put(mail("two", msgid="t2@c", sender="b@customer.test"),
           mail("three", msgid="t3@c", sender="c@customer.test"),
           mail("four", msgid="t4@c", sender="d@customer.test"))
    hx.drain()
    assert len(hx.outbox()) == 4
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(16)
        sender = Sender(hx.engine, Relay(host="127.0.0.1", port=mute.getsockname()[1], timeout=1),
                        hx.home.path / "store" / "outbox", SenderCfg())
        # When the sender makes a pass
        sender.run_once()
    # Then one mail is charged an attempt, the others wait uncharged and unleased
    rows = hx.outbox()
    assert sorted(r.attempts for r in rows) == [0, 0, 0, 1]
    assert all(r.state == "pending" for r in rows)
    assert [r.lease_until for r in rows if r.attempts == 0] == [None, None, None]


def test_stop_requested_ends_the_pass_and_releases_the_rest(hx, sink):
    import threading

    hx.put(mail("two", msgid="s2@c", sender="b@customer.test"))
    hx.drain()
    stop = threading.Event()
    stop.set()
    _sender(hx, sink.port).run_once(stop)
    rows = hx.outbox()
    assert [(r.state, r.attempts, r.lease_until) for r in rows] == [("pending", 0, None)] * 2
    assert sink.messages == []


def test_a_pass_reads_its_mails_with_their_lease_and_records_them_in_one_transaction(hx, sink):
    from sqlalchemy import event, insert

    # Given three more due mails, one of them to two recipients, with bytes to keep exactly
    raw = b"From: support@example.com\r\nSubject: x\r\n\r\n.leading dot\r\nend\r\n"
    with hx.engine.begin() as c:
        c.execute(insert(m.Outbox), [dict(
            mail_from=f"bounces+{i}@example.com", message_id=f"<x{i}@example.com>",
            rcpt_tos=["a@customer.test", "b@customer.test"] if i == 0 else ["c@customer.test"],
            raw=raw + f"{i}\r\n".encode(), state="pending", attempts=0,
            next_attempt_at=now() - timedelta(seconds=1), created_at=now()) for i in range(3)])
    checkouts: list[object] = []
    event.listen(hx.engine, "checkout", lambda *a: checkouts.append(a))
    # When the sender makes a pass
    assert _sender(hx, sink.port).run_once() == 4
    # Then it used the store three times (SQLite: a look without the write lock, the lease
    # that also read the mails, the record; PostgreSQL: no look): no read of its own
    assert len(checkouts) == (3 if hx.engine.dialect.name == "sqlite" else 2)
    # And the relay got each mail's envelope and bytes as stored, the rows and the
    # acknowledgement's article are marked sent
    got = {frm: (rcpts, data) for frm, rcpts, data in sink.messages}
    assert len(got) == 4
    for i in range(3):
        assert got[f"bounces+{i}@example.com"] == (
            ["a@customer.test", "b@customer.test"] if i == 0 else ["c@customer.test"],
            raw + f"{i}\r\n".encode())
    rows = hx.outbox()
    assert [(r.state, r.attempts, r.lease_until) for r in rows] == [("sent", 1, None)] * 4
    assert all(r.sent_at is not None for r in rows)
    out = [a for a in hx.articles() if a.direction == "out"][0]
    assert out.delivery_state == "sent"


def test_the_lease_takes_the_oldest_due_and_leaves_leased_and_later_mail(hx, sink):
    from sqlalchemy import insert

    # Given mails due at different times, one leased by another sender, one not yet due
    t = now()
    rows = [dict(mail_from=f"o{i}@example.com", message_id=f"<o{i}@example.com>",
                 rcpt_tos=["c@customer.test"], raw=b"Subject: o\r\n\r\nx\r\n", state="pending",
                 attempts=0, next_attempt_at=t - timedelta(seconds=s), created_at=t,
                 lease_until=lease)
            for i, (s, lease) in enumerate([(10, None), (50, None), (30, t + timedelta(minutes=1)),
                                            (-60, None), (40, t - timedelta(minutes=1))])]
    with hx.engine.begin() as c:
        c.execute(update(m.Outbox).values(next_attempt_at=t + timedelta(hours=1)))  # the ack
        c.execute(insert(m.Outbox), rows)
    sender = _sender(hx, sink.port)
    sender.batch_size = 2
    # When the sender makes a pass with room for two
    assert sender.run_once() == 2
    # Then it sent the two oldest due, unleased (or with an expired lease) mails, oldest first
    assert [frm for frm, _, _ in sink.messages] == ["o1@example.com", "o4@example.com"]
    # And the next pass takes the last due one; the leased and the later one stay
    assert sender.run_once() == 1
    assert sender.run_once() == 0
    state = {r.message_id: r.state for r in hx.outbox()}
    assert [state[f"<o{i}@example.com>"] for i in range(5)] == ["sent", "sent", "pending",
                                                                "pending", "sent"]


class _Sessions:
    """A relay (aiosmtpd) that records which session each mail came in on."""

    def __init__(self) -> None:
        self.peers: list[object] = []
        self.noops = 0

    async def handle_NOOP(self, server, session, envelope, arg):  # type: ignore[no-untyped-def]
        self.noops += 1
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.peers.append(session.peer)
        return "250 2.0.0 OK"


def _queue_acks(hx: Harness, n: int, tag: str) -> None:
    from sqlalchemy import insert

    with hx.engine.begin() as c:
        c.execute(insert(m.Outbox), [dict(
            mail_from="bounces@example.com", message_id=f"<{tag}{i}@example.com>",
            rcpt_tos=["c@customer.test"], raw=b"Subject: a\r\n\r\nx\r\n", state="pending",
            attempts=0, next_attempt_at=now() - timedelta(seconds=1), created_at=now())
            for i in range(n)])


def test_the_relay_session_is_kept_between_passes_and_checked_before_use(hx):
    from aiosmtpd.controller import Controller

    from tests.conftest import free_port

    relay = _Sessions()
    port = free_port()
    controller = Controller(relay, hostname="127.0.0.1", port=port)
    controller.start()
    sender = _sender(hx, port)
    try:
        # Given a pass that sent mail (the fixture's acknowledgement and two more)
        _queue_acks(hx, 2, "a")
        assert sender.run_once() == 3
        # When more mail comes for a second pass
        _queue_acks(hx, 2, "b")
        assert sender.run_once() == 2
        # Then it went over the same session, checked once with NOOP
        assert len(relay.peers) == 5 and len(set(relay.peers)) == 1
        assert relay.noops == 1
        # When the relay drops the session between passes (a restart)
        controller.stop()
        controller = Controller(relay, hostname="127.0.0.1", port=port)
        controller.start()
        _queue_acks(hx, 1, "c")
        assert sender.run_once() == 1
        # Then the pass opened a new one, and charged the mail one attempt only
        assert len(relay.peers) == 6 and relay.peers[5] != relay.peers[0]
        row = [r for r in hx.outbox() if r.message_id == "<c0@example.com>"][0]
        assert (row.state, row.attempts) == ("sent", 1)
    finally:
        sender.close_relay()
        controller.stop()
    assert sender._conn is None


def test_a_relay_session_carries_at_most_a_batch_of_mails(hx):
    from aiosmtpd.controller import Controller

    from tests.conftest import free_port

    relay = _Sessions()
    port = free_port()
    controller = Controller(relay, hostname="127.0.0.1", port=port)
    controller.start()
    sender = _sender(hx, port)
    sender.batch_size = 2
    try:
        _queue_acks(hx, 4, "a")
        while sender.run_once():
            pass
    finally:
        sender.close_relay()
        controller.stop()
    assert len(relay.peers) == 5
    sessions = [relay.peers.count(p) for p in dict.fromkeys(relay.peers)]
    assert sessions == [2, 2, 1]


def test_a_kept_session_to_a_relay_that_stopped_answering_costs_no_relay_timeout(hx):
    # Given a relay that took a pass's mail and then stopped answering, its connection open
    import socket
    import threading
    import time

    greeted = threading.Event()
    mute = threading.Event()

    def relay(server: socket.socket) -> None:
        conn, _ = server.accept()
        f = conn.makefile("rb")
        conn.sendall(b"220 relay\r\n")
        while not mute.is_set():
            line = f.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                conn.sendall(b"250-relay\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go\r\n")
                while f.readline() not in (b".\r\n", b""):
                    pass
                conn.sendall(b"250 ok\r\n")
                greeted.set()
                mute.set()  # from now on: silence, the connection left open
            else:
                conn.sendall(b"250 ok\r\n")
        time.sleep(60)
        conn.close()

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        threading.Thread(target=relay, args=(server,), daemon=True).start()
        sender = Sender(hx.engine, Relay(host="127.0.0.1", port=server.getsockname()[1],
                                         timeout=60),
                        hx.home.path / "store" / "outbox", SenderCfg())
        assert sender.run_once() == 1 and greeted.is_set()
        # When the sender is stopped (or idle) and closes the session it kept
        t = time.monotonic()
        sender.close_relay()
        # Then it does not wait the relay's 60 s timeout for the QUIT's answer
        assert time.monotonic() - t < 20
        assert sender._conn is None


def _relay_silent_after_data(got_data):  # type: ignore[no-untyped-def]
    """A relay (run it in a thread on a listening socket) that greets, answers every command,
    reads one mail's DATA and from then on never answers, its connection left open."""
    import time

    def relay(server) -> None:  # type: ignore[no-untyped-def]
        conn, _ = server.accept()
        f = conn.makefile("rb")
        conn.sendall(b"220 relay\r\n")
        while line := f.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                conn.sendall(b"250-relay\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go\r\n")
                while f.readline() not in (b".\r\n", b""):
                    pass
                got_data.set()  # no answer from now on; the connection stays open
                time.sleep(60)
                return
            else:
                conn.sendall(b"250 ok\r\n")

    return relay


def test_a_stopping_sender_does_not_wait_the_relay_timeout_for_a_data_answer(hx):
    # Given a relay that reads a mail's DATA and then never answers it
    import socket
    import threading
    import time

    got_data = threading.Event()
    relay = _relay_silent_after_data(got_data)

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        threading.Thread(target=relay, args=(server,), daemon=True).start()
        sender = Sender(hx.engine, Relay(host="127.0.0.1", port=server.getsockname()[1],
                                         timeout=30),
                        hx.home.path / "store" / "outbox", SenderCfg())
        stop, wake = threading.Event(), threading.Event()
        t = threading.Thread(target=sender.run, args=(stop, wake), daemon=True)
        t.start()
        assert got_data.wait(10)
        # When the gateway stops while the sender waits for the relay's answer
        t0 = time.monotonic()
        stop.set()
        wake.set()
        t.join(15)
        # Then the sender ends within a few seconds, not the relay's 30 s timeout
        assert not t.is_alive() and time.monotonic() - t0 < 10
    # And the mail is not charged an attempt: released, pending, sent after the restart
    [row] = hx.outbox()
    assert (row.state, row.attempts, row.lease_until) == ("pending", 0, None)


def test_mailgw_run_stops_within_seconds_while_its_relay_withholds_a_data_answer(home, gateway):
    # Given `mailgw run` whose relay took a mail's DATA and never answers it
    import smtplib
    import socket
    import threading
    import time

    got_data = threading.Event()
    relay = _relay_silent_after_data(got_data)

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        threading.Thread(target=relay, args=(server,), daemon=True).start()
        home.update_config(relay={"host": "127.0.0.1", "port": server.getsockname()[1]},
                           default_queue="support")
        gateway.start()
        with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as s:
            s.sendmail("c@customer.test", ["support@example.com"],
                       b"Subject: help\r\nMessage-ID: <stop1@c>\r\n\r\nhello\r\n")
        assert got_data.wait(30)  # the acknowledgement's DATA is with the relay
        # When the gateway is stopped
        t = time.monotonic()
        gateway.stop(timeout=20)
        # Then it stops in about QUICK (2 s), not the relay's timeout (30 s)
        assert time.monotonic() - t < 10


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"),
                    reason="a full accept queue drops the connect's SYN on Linux")
def test_a_stopping_sender_does_not_wait_for_a_connect_the_relay_host_never_answers(hx):
    # Given a relay host that never completes the TCP handshake (its accept queue is full and
    # nobody accepts: Linux drops the SYN, as a firewall that drops or a host gone would)
    import socket
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(c)
    time.sleep(0.3)
    try:
        sender = Sender(hx.engine, Relay(host="127.0.0.1", port=port, timeout=20),
                        hx.home.path / "store" / "outbox", SenderCfg())
        stop, wake = threading.Event(), threading.Event()
        t = threading.Thread(target=sender.run, args=(stop, wake), daemon=True)
        t.start()
        time.sleep(1.0)  # the pass is in connect()
        # When the gateway stops
        t0 = time.monotonic()
        stop.set()
        wake.set()
        t.join(30)
        # Then the sender ends within seconds, not the relay's 20 s timeout
        assert not t.is_alive() and time.monotonic() - t0 < 10
    finally:
        for c in fillers:
            c.close()
        server.close()
    # And the mail is not charged an attempt: released, pending, sent after the restart
    [row] = hx.outbox()
    assert (row.state, row.attempts, row.lease_until) == ("pending", 0, None)
