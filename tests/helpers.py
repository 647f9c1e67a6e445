"""In-process helpers: queue raw messages and run the worker against a test home's store."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from sqlalchemy import select

from mailgw.outbound.render import Renderer
from mailgw.process import Context
from mailgw.queue import put_many
from mailgw.store import models as m
from mailgw.types import Envelope
from mailgw.worker import Worker


def envelope(raw: bytes, rcpt: str = "support@example.com", mail_from: str = "x@customer.test",
             **kw) -> Envelope:  # type: ignore[no-untyped-def]
    return Envelope(raw=raw, mail_from=mail_from, rcpt_tos=(rcpt,), source="smtp",
                    received_at=datetime.now(UTC), **kw)


def mail(subject: str, body: str = "body", sender: str = "alice@customer.test",
         msgid: str | None = None, to: str = "support@example.com", **headers: str) -> bytes:
    lines = [f"From: {sender}", f"To: {to}", f"Subject: {subject}"]
    if msgid:
        lines.append(f"Message-ID: <{msgid}>")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()


class Harness:
    """A store plus a worker, driven step by step from a test."""

    def __init__(self, home):  # type: ignore[no-untyped-def]
        self.home = home
        self.engine = home.engine()
        self.settings = home.settings()
        self.renderer = Renderer(home.path / "templates")
        self.worker = Worker(self.engine, lambda: Context(self.settings, self.renderer),
                             batch_size=self.settings.worker.batch_size,
                             max_attempts=self.settings.worker.max_attempts)

    def put(self, *raws: bytes, **kw) -> list[int]:  # type: ignore[no-untyped-def]
        return put_many(self.engine, [envelope(r, **kw) for r in raws])

    def drain(self) -> None:
        # A reply held back for its original (worker.orphan_reply_wait, decision 31) is
        # pending but not claimable for a moment: wait for it.
        deadline = time.monotonic() + 30
        while True:
            if self.worker.run_batch() == 0:
                if not self.pending():
                    return
                if time.monotonic() > deadline:
                    raise AssertionError("worker did not drain the queue")
                time.sleep(0.01)

    def pending(self) -> int:
        with self.engine.connect() as c:
            return len(c.execute(select(m.Inbound.id).where(m.Inbound.state == "pending")).all())

    def inbound(self, inbound_id: int) -> m.Inbound:
        from sqlalchemy.orm import Session

        with Session(self.engine) as s:
            row = s.get(m.Inbound, inbound_id)
            if row is not None:
                row.raw  # noqa: B018 - read now (inbound_raw): the row is used detached
            return row

    def tickets(self) -> list[m.Ticket]:
        from sqlalchemy.orm import Session

        with Session(self.engine) as s:
            return list(s.scalars(select(m.Ticket).order_by(m.Ticket.id)))

    def articles(self, ticket_id: int | None = None) -> list[m.Article]:
        from sqlalchemy.orm import Session

        with Session(self.engine) as s:
            q = select(m.Article).order_by(m.Article.id)
            if ticket_id is not None:
                q = q.where(m.Article.ticket_id == ticket_id)
            return list(s.scalars(q))

    def events(self, type_: str) -> list[m.Event]:
        from sqlalchemy.orm import Session

        with Session(self.engine) as s:
            return list(s.scalars(select(m.Event).where(m.Event.type == type_)))

    def outbox(self) -> list[m.Outbox]:
        from sqlalchemy.orm import Session

        with Session(self.engine) as s:
            return list(s.scalars(select(m.Outbox).order_by(m.Outbox.id)))

    def close(self) -> None:
        self.engine.dispose()


def pg_harness(home):  # type: ignore[no-untyped-def]
    """A ``Harness`` on a PostgreSQL home, the test skipped on SQLite (``yield from`` it in a
    fixture of tests that check PostgreSQL's own statements)."""
    import pytest

    if not home.store_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    h = Harness(home)
    yield h
    h.close()
