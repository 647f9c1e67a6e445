"""The next batch claimed and parsed while the current one is stored (PostgreSQL; decision 39).

In its run loop (``Worker.ahead``) a PostgreSQL worker claims the next full batch in a short
transaction of its own and parses it on a thread while it stores the current one. Every
guarantee holds: a batch is stored after the previous one committed (a reply finds the
ticket its original made), each message is processed once, a stopping worker gives the
rows claimed ahead back, a failed claim or parse ahead loses nothing.
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy.exc import OperationalError

from mailgw.process import Context
from mailgw.worker import Worker
from tests.helpers import Harness, mail, pg_harness


@pytest.fixture
def hx(home):  # type: ignore[no-untyped-def]
    yield from pg_harness(home)


def _worker(hx: Harness, batch_size: int) -> Worker:
    w = Worker(hx.engine, lambda: Context(hx.settings, hx.renderer), batch_size=batch_size,
               max_attempts=3)
    w.ahead = True  # as Worker.run sets it
    return w


def _senders(n: int) -> list[bytes]:
    return [mail(f"Question {i}", msgid=f"q{i}@c", sender=f"c{i}@customer.test")
            for i in range(n)]


def _drain(w: Worker) -> int:
    n = total = 0
    while (n := w.run_batch()) or w._ahead is not None:
        total += n
    w.release_next()
    return total


def test_the_next_batch_is_claimed_and_parsed_while_the_current_one_is_stored(hx, monkeypatch):
    w = _worker(hx, batch_size=2)
    ids = hx.put(*_senders(4))
    parsed: list[tuple[list[int], str]] = []
    next_parsed = threading.Event()
    real_parse, real_store = Worker._parse, Worker._store

    def parse(self, batch, ctx, engine=None):  # type: ignore[no-untyped-def]
        out = real_parse(self, batch, ctx, engine)
        parsed.append((list(batch), threading.current_thread().name))
        if batch == ids[2:]:
            next_parsed.set()
        return out

    seen_in_store: list[tuple] = []

    def store(self, batch, *a, **kw):  # type: ignore[no-untyped-def]
        if batch == ids[:2]:
            # While the first batch is being stored (its transaction not begun yet), the
            # second is claimed, leased to this worker, and parsed on another thread.
            assert next_parsed.wait(10), "the next batch was not parsed during the store"
            seen_in_store.extend((hx.inbound(i).state, hx.inbound(i).claimed_by,
                                  hx.inbound(i).attempts) for i in ids[2:])
        return real_store(self, batch, *a, **kw)

    monkeypatch.setattr(Worker, "_parse", parse)
    monkeypatch.setattr(Worker, "_store", store)
    assert w.run_batch() == 2
    assert seen_in_store == [("pending", w.me, 1)] * 2
    assert parsed[0] == (ids[:2], threading.current_thread().name)
    assert parsed[1][0] == ids[2:] and parsed[1][1] != threading.current_thread().name
    # The next pass stores what was parsed ahead: not parsed again, its attempt counted once
    assert w.run_batch() == 2
    assert [b for b, _ in parsed].count(ids[2:]) == 1
    assert [(hx.inbound(i).state, hx.inbound(i).attempts) for i in ids] == [("done", 1)] * 4
    assert w.run_batch() == 0
    assert w._ahead is None


def test_a_reply_in_the_batch_parsed_ahead_threads_into_the_ticket_of_the_batch_before(hx):
    # The parse runs ahead, the threading does not: the reply's batch is stored after its
    # original's batch committed.
    w = _worker(hx, batch_size=2)
    hx.put(mail("Printer broken", msgid="orig@c", sender="ann@customer.test"),
           mail("Other", msgid="other@c", sender="bob@customer.test"),
           mail("Re: Printer broken", msgid="reply@c", sender="ann@customer.test",
                In_Reply_To="<orig@c>", References="<orig@c>"),
           mail("Third", msgid="third@c", sender="cy@customer.test"))
    assert _drain(w) == 4
    tickets = hx.tickets()
    assert len(tickets) == 3
    by_msgid = {a.message_id: a.ticket_id for a in hx.articles() if a.direction == "in"}
    assert by_msgid["reply@c"] == by_msgid["orig@c"]


def test_only_a_full_batch_of_fresh_rows_is_claimed_ahead(hx):
    w = _worker(hx, batch_size=2)
    ids = hx.put(*_senders(3))
    assert w.run_batch() == 2
    w.release_next()  # waits for the thread: it found one row, not a full batch
    assert hx.inbound(ids[2]).claimed_by is None and hx.inbound(ids[2]).attempts == 0
    assert w.run_batch() == 1  # claimed after the store, as before
    assert hx.inbound(ids[2]).state == "done"


def test_a_stopping_worker_gives_back_the_batch_claimed_ahead(hx):
    w = _worker(hx, batch_size=2)
    ids = hx.put(*_senders(4))
    stop, wake = threading.Event(), threading.Event()
    real = w.run_batch

    def once():  # type: ignore[no-untyped-def]
        n = real()
        stop.set()  # asked to stop while the next batch is claimed (and parsed) ahead
        return n

    w.run_batch = once  # type: ignore[method-assign]
    w.run(stop, wake, poll_interval=0.01)
    assert w._ahead is None
    assert [hx.inbound(i).state for i in ids] == ["done", "done", "pending", "pending"]
    for iid in ids[2:]:
        row = hx.inbound(iid)
        # claimed ahead (its attempt counted, as for any claim given back), then freed
        assert (row.claimed_by, row.claimed_until, row.attempts) == (None, None, 1)


def test_a_parse_that_fails_ahead_is_done_again_on_the_worker_thread(hx, monkeypatch):
    w = _worker(hx, batch_size=2)
    ids = hx.put(*_senders(4))
    real = Worker._parse
    failed = []

    def parse(self, batch, ctx, engine=None):  # type: ignore[no-untyped-def]
        if threading.current_thread().name == "worker-ahead" and not failed:
            failed.append(batch)
            raise OperationalError("SELECT", {}, Exception("server closed the connection"))
        return real(self, batch, ctx, engine)

    monkeypatch.setattr(Worker, "_parse", parse)
    assert _drain(w) == 4
    assert failed == [ids[2:]]
    assert [(hx.inbound(i).state, hx.inbound(i).attempts) for i in ids] == [("done", 1)] * 4
    assert len(hx.tickets()) == 4


def test_a_claim_that_fails_ahead_leaves_the_rows_to_the_next_claim(hx, monkeypatch):
    w = _worker(hx, batch_size=2)
    ids = hx.put(*_senders(4))
    real = Worker._claim_in
    failed = []

    def claim_in(self, s, stamp, *, first):  # type: ignore[no-untyped-def]
        out = real(self, s, stamp, first=first)
        if threading.current_thread().name == "worker-ahead" and not failed:
            failed.append(out)
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))
        return out

    monkeypatch.setattr(Worker, "_claim_in", claim_in)
    assert w.run_batch() == 2
    w.release_next()
    assert failed == [ids[2:]]
    # rolled back with the claim's transaction: not leased, no attempt counted
    assert [(hx.inbound(i).claimed_by, hx.inbound(i).attempts) for i in ids[2:]] == [
        (None, 0)] * 2
    assert _drain(w) == 2
    assert [(hx.inbound(i).state, hx.inbound(i).attempts) for i in ids] == [("done", 1)] * 4


def test_a_batch_rolled_back_keeps_the_batch_claimed_ahead(hx, monkeypatch):
    # The current batch fails (released, retried a message at a time); the batch claimed
    # and parsed ahead is stored on the next pass, once.
    w = _worker(hx, batch_size=2)
    ids = hx.put(*_senders(4))
    real = Worker._store
    calls = []

    def store(self, batch, *a, **kw):  # type: ignore[no-untyped-def]
        calls.append(list(batch))
        if len(calls) == 1:
            # fails once the next batch is claimed ahead (a claim that sees the failed rows
            # given back first claims nothing: they are retried one at a time, before it)
            deadline = time.monotonic() + 10
            while hx.inbound(ids[2]).claimed_by != w.me and time.monotonic() < deadline:
                time.sleep(0.01)
            raise OperationalError("INSERT", {}, Exception("disk full"))
        return real(self, batch, *a, **kw)

    monkeypatch.setattr(Worker, "_store", store)
    assert w.run_batch() == 0  # rolled back, released
    assert w._ahead is not None  # the run loop does not wait for a wake-up then
    assert w.run_batch() == 2  # the batch claimed ahead
    assert calls[1] == ids[2:]
    assert _drain(w) == 2  # the first two, one at a time
    assert [hx.inbound(i).state for i in ids] == ["done"] * 4
    assert [hx.inbound(i).attempts for i in ids] == [2, 2, 1, 1]
    assert len(hx.tickets()) == 4


def test_no_batch_is_claimed_ahead_outside_the_run_loop(hx):
    # ``run_batch`` alone (tests, tools) claims the next full batch in the store transaction,
    # as before.
    w = _worker(hx, batch_size=2)
    w.ahead = False
    ids = hx.put(*_senders(4))
    assert w.run_batch() == 2
    assert w._ahead is None and w._next == ids[2:]
