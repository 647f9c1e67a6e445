"""What the worker works out from a message alone (its class, the parts of its text) is
computed in its parse step, before the write transaction that stores the batch (issue 8,
session 5: less work under SQLite's one write lock), and gives the same rows."""

from __future__ import annotations

import pytest

from mailgw import process as process_mod
from mailgw.worker import Worker
from tests.helpers import Harness, mail


@pytest.fixture
def hx(home):  # type: ignore[no-untyped-def]
    h = Harness(home)
    yield h
    h.close()


def _watch(monkeypatch) -> dict[str, list[bool]]:  # type: ignore[no-untyped-def]
    """Record, for each call of classify and reply_parts, whether a store step was running."""
    storing = [False]
    calls: dict[str, list[bool]] = {"classify": [], "reply_parts": []}
    store = Worker._store

    def _store(self, *a, **kw):  # type: ignore[no-untyped-def]
        storing[0] = True
        try:
            return store(self, *a, **kw)
        finally:
            storing[0] = False
    monkeypatch.setattr(Worker, "_store", _store)
    for name in calls:
        real = getattr(process_mod, name)

        def wrapped(*a, _real=real, _name=name, **kw):  # type: ignore[no-untyped-def]
            calls[_name].append(storing[0])
            return _real(*a, **kw)
        monkeypatch.setattr(process_mod, name, wrapped)
    return calls


def test_classification_and_reply_parts_are_computed_before_the_store_transaction(
        hx, monkeypatch):
    calls = _watch(monkeypatch)
    ids = hx.put(
        mail("Printer", body="Room 4, please hurry.\r\n\r\n-- \r\nAlice", msgid="p1@c"),
        mail("Re: Printer", body="Still broken.\r\n\r\nOn Monday support wrote:\r\n> hi",
             msgid="p2@c", In_Reply_To="<p1@c>"),
        mail("Out of office", msgid="p3@c", Auto_Submitted="auto-replied"),
    )
    assert hx.worker.run_batch() == 3
    assert calls["classify"] == [False, False, False]
    assert calls["reply_parts"] == [False, False, False]
    rows = {r.inbound_id: r for r in hx.articles() if r.direction == "in"}
    assert [hx.inbound(i).state for i in ids] == ["done"] * 3
    first, reply, auto = (rows[i] for i in ids)
    assert first.visible_text == "Room 4, please hurry." and first.signature_text
    assert reply.visible_text == "Still broken." and "> hi" in reply.quoted_text
    assert reply.ticket_id == first.ticket_id
    assert first.mail_class == "human" and auto.mail_class != "human"
    assert auto.is_automatic and auto.automatic_reason


def test_a_message_whose_preparation_fails_is_still_quarantined_alone(hx, monkeypatch):
    real = process_mod.classify

    def classify(parsed, *a, **kw):  # type: ignore[no-untyped-def]
        if parsed.subject == "bad":
            raise ValueError("cannot classify")
        return real(parsed, *a, **kw)
    monkeypatch.setattr(process_mod, "classify", classify)
    ids = hx.put(mail("good", msgid="g1@c"), mail("bad", msgid="b1@c"),
                 mail("good too", msgid="g2@c"))
    hx.drain()
    states = [hx.inbound(i) for i in ids]
    assert [r.state for r in states] == ["done", "quarantined", "done"]
    assert "cannot classify" in states[1].error


def _run_worker(hx, wake):  # type: ignore[no-untyped-def]
    import threading

    stop = threading.Event()
    t = threading.Thread(target=hx.worker.run, args=(stop, wake, 0.05), daemon=True)
    t.start()
    return stop, t


@pytest.mark.timeout(60)
def test_a_worker_woken_for_a_small_batch_waits_for_the_next_commit(hx, monkeypatch):
    """SQLite: fewer than ``min_batch`` rows waiting, the worker waits (up to ``linger``)
    for the intake's next commit and claims both commits' rows in one batch."""
    import threading

    if hx.engine.dialect.name != "sqlite":
        pytest.skip("the minimum batch is SQLite's (its one write lock)")
    hx.worker = Worker(hx.engine, hx.worker.context, batch_size=2, max_attempts=3,
                       linger=30.0, linger_gap=30.0)
    assert hx.worker.min_batch == 2
    batches: list[list[int]] = []
    parse = hx.worker._parse

    def _parse(ids, ctx):  # type: ignore[no-untyped-def]
        batches.append(list(ids))
        return parse(ids, ctx)
    monkeypatch.setattr(hx.worker, "_parse", _parse)
    waiting = threading.Event()
    gather = hx.worker._gather

    def _gather(n):  # type: ignore[no-untyped-def]
        waiting.set()
        return gather(n)
    monkeypatch.setattr(hx.worker, "_gather", _gather)
    [first] = hx.put(mail("one", msgid="o1@c"))
    wake = threading.Event()
    wake.set()
    stop, t = _run_worker(hx, wake)
    try:
        assert waiting.wait(20)
        [second] = hx.put(mail("two", msgid="o2@c"))
        wake.set()  # what the intake does after its commit
        for _ in range(400):
            if hx.pending() == 0:
                break
            threading.Event().wait(0.05)
    finally:
        stop.set()
        wake.set()
        t.join(20)
    assert batches == [[first, second]]
    assert [hx.inbound(i).state for i in (first, second)] == ["done", "done"]


@pytest.mark.timeout(60)
def test_a_small_batch_is_claimed_when_no_more_comes(hx):
    import threading

    hx.worker = Worker(hx.engine, hx.worker.context, batch_size=64, max_attempts=3,
                       linger=0.01)
    [only] = hx.put(mail("alone", msgid="a1@c"))
    wake = threading.Event()
    wake.set()
    stop, t = _run_worker(hx, wake)
    try:
        for _ in range(400):
            if hx.pending() == 0:
                break
            threading.Event().wait(0.05)
    finally:
        stop.set()
        wake.set()
        t.join(20)
    assert hx.inbound(only).state == "done"
