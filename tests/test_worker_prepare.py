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
