"""What PostgreSQL's server is asked to do on the hot path (issue 8, session 7): statements
and transactions that bought nothing, cut. PostgreSQL only; the SQLite paths are tested in
tests/test_sender.py and tests/test_write_lock.py."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from mailgw.outbound.sender import Sender
from mailgw.settings import Relay
from mailgw.settings import Sender as SenderCfg
from mailgw.store.db import read_session
from tests.helpers import mail, pg_harness


@pytest.fixture
def hx(home):  # type: ignore[no-untyped-def]
    yield from pg_harness(home)


def _statements(monkeypatch) -> list[str]:  # type: ignore[no-untyped-def]
    """Every statement sent through a psycopg cursor from now on (the sender's own SQL)."""
    import psycopg

    seen: list[str] = []
    real = psycopg.Cursor.execute

    def execute(self, query, params=None, **kw):  # type: ignore[no-untyped-def]
        seen.append(query if isinstance(query, str) else str(query))
        return real(self, query, params, **kw)

    monkeypatch.setattr(psycopg.Cursor, "execute", execute)
    return seen


def test_a_pass_records_its_mails_and_their_articles_with_one_statement(hx, sink, monkeypatch):
    hx.put(*[mail(f"Question {i}", msgid=f"q{i}@c", sender=f"c{i}@customer.test")
             for i in range(3)])
    hx.drain()
    sender = Sender(hx.engine, Relay(host="127.0.0.1", port=sink.port, timeout=5),
                    hx.home.path / "store" / "outbox", SenderCfg(), batch_size=10)
    seen = _statements(monkeypatch)
    assert sender.run_once() == 3
    marks = [" ".join(q.split()) for q in seen
             if "SET delivery_state" in q or "SET attempts = attempts + 1" in q]
    # One statement marks the rows and their articles sent (before: one for each)
    assert len(marks) == 1
    assert "UPDATE articles SET delivery_state = 'sent'" in marks[0]
    assert "UPDATE outbox SET attempts = attempts + 1" in marks[0]
    assert [r.state for r in hx.outbox()] == ["sent"] * 3
    assert [a.delivery_state for a in hx.articles() if a.direction == "out"] == ["sent"] * 3


def test_the_record_of_a_pass_leases_what_became_due_meanwhile(hx, sink):
    # Under load the next mails are due before a pass ends: they are leased by the
    # transaction that records the pass, not by one of their own (a commit fewer a pass).
    hx.put(mail("First", msgid="f@c", sender="f@customer.test"))
    hx.drain()
    sender = Sender(hx.engine, Relay(host="127.0.0.1", port=sink.port, timeout=5),
                    hx.home.path / "store" / "outbox", SenderCfg(), batch_size=10)
    real_send = sender._send

    def send(*a):  # type: ignore[no-untyped-def]
        real_send(*a)
        if not hx.pending() and len(hx.outbox()) == 1:
            hx.put(mail("Second", msgid="s@c", sender="s@customer.test"))
            hx.drain()  # its acknowledgement is due now

    sender._send = send  # type: ignore[method-assign]
    assert sender.run_once() == 1
    second = [r for r in hx.outbox() if r.state == "pending"]
    assert len(second) == 1 and second[0].lease_until is not None
    assert sender._next == [second[0].id]
    assert sender.run_once() == 1
    assert [r.state for r in hx.outbox()] == ["sent", "sent"]


def test_a_read_session_keeps_the_statements_psycopg_prepared(hx):
    # psycopg prepares a statement run five times on a connection and forgets all of them
    # (DEALLOCATE ALL) after a ROLLBACK. The worker's read of each batch (read_session) ended
    # with one, so its store transaction parsed and planned every statement again.
    with hx.engine.connect() as c:
        pid = c.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        for _ in range(6):
            c.execute(text("SELECT count(*) FROM inbound WHERE id > :i"), {"i": 0})
        assert c.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements").scalar() >= 1
        c.commit()
    with read_session(hx.engine) as s:
        assert s.execute(text("SELECT pg_backend_pid()")).scalar() == pid  # the same one
        s.execute(text("SELECT count(*) FROM tickets")).scalar()
    with hx.engine.connect() as c:
        assert c.exec_driver_sql("SELECT pg_backend_pid()").scalar() == pid
        assert c.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements").scalar() >= 1


def test_a_read_session_that_fails_still_rolls_back(hx):
    with pytest.raises(Exception, match="no_such_table"):
        with read_session(hx.engine) as s:
            s.execute(text("SELECT * FROM no_such_table"))
    with read_session(hx.engine) as s:  # the connection is usable again
        assert s.execute(text("SELECT 1")).scalar() == 1
