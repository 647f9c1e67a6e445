"""The worker: claim pending inbound messages, process them, commit in groups.

A batch is one transaction. Each message runs in its own SAVEPOINT, so a message that fails is
rolled back alone and quarantined with its error, while the rest of the batch commits. On
PostgreSQL the claim is ``FOR UPDATE SKIP LOCKED``: several workers, on one node or many, take
disjoint rows, and a worker that dies mid-batch releases its rows (its transaction aborts) for
another to take. A message is marked ``done`` in the transaction that stores its ticket, so it
is processed exactly once.

Database errors (a deadlock, a lost connection, a value the database refuses) abort the whole
transaction; the worker then retries message by message, counting attempts, and quarantines
a message only after ``worker.max_attempts`` failures, so a passing fault loses nothing.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable

from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from mailgw.process import Context, Quarantine, process
from mailgw.queue import now
from mailgw.store import models as m
from mailgw.types import ParseError

log = logging.getLogger(__name__)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, Quarantine):
        return str(exc)
    if isinstance(exc, ParseError):
        text = str(exc)
        return text if text.startswith("not an email message") else f"not an email message: {text}"
    tb = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {tb[0].filename.rsplit('/', 1)[-1]}:{tb[0].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"[:4000]


class Worker:
    def __init__(self, engine: Engine, context: Callable[[], Context], *, batch_size: int,
                 max_attempts: int, on_outbox: Callable[[], None] | None = None):
        self.engine = engine
        self.context = context  # returns the current settings + renderer (reloadable later)
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.on_outbox = on_outbox
        self._one_by_one = False

    def _claim(self, session: Session, limit: int) -> list[m.Inbound]:
        q = select(m.Inbound).where(m.Inbound.state == "pending").order_by(m.Inbound.id).limit(limit)
        if self.engine.dialect.name == "postgresql":
            q = q.with_for_update(skip_locked=True)
        return list(session.scalars(q))

    def run_batch(self) -> int:
        """Process up to one batch; returns how many messages were handled."""
        limit = 1 if self._one_by_one else self.batch_size
        ctx = self.context()
        self._current: int | None = None
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                rows = self._claim(session, limit)
                for row in rows:
                    self._current = row.id
                    self._process_one(session, row, ctx)
        except DBAPIError as exc:
            if self._one_by_one and self._current is not None:
                self._count_failure(self._current, exc)
            else:
                log.warning("batch rolled back by a database error, retrying one by one: %s",
                            _describe(exc))
            self._one_by_one = True
            return 0
        self._one_by_one = False
        if rows and self.on_outbox:
            self.on_outbox()
        return len(rows)

    def _process_one(self, session: Session, row: m.Inbound, ctx: Context) -> None:
        savepoint = session.begin_nested()
        try:
            process(session, row, ctx)
            savepoint.commit()
        except DBAPIError:
            raise
        except Exception as exc:
            savepoint.rollback()
            reason = _describe(exc)
            log.warning("inbound %s quarantined: %s", row.id, reason)
            row.state, row.error, row.attempts = "quarantined", reason, row.attempts + 1
            row.processed_at = now()
            session.add(m.Event(type="quarantined", inbound_id=row.id, created_at=now(),
                                data={"reason": reason}))

    def _count_failure(self, inbound_id: int, exc: DBAPIError) -> None:
        """One message failed on its own with a database error: count it, maybe quarantine."""
        reason = _describe(exc)
        with Session(self.engine) as session, session.begin():
            q = select(m.Inbound).where(m.Inbound.id == inbound_id, m.Inbound.state == "pending")
            if self.engine.dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)
            row = session.scalars(q).first()
            if row is None:
                return
            row.attempts += 1
            row.error = reason
            if row.attempts >= self.max_attempts:
                row.state, row.processed_at = "quarantined", now()
                session.add(m.Event(type="quarantined", inbound_id=row.id, created_at=now(),
                                    data={"reason": reason, "attempts": row.attempts}))
                log.error("inbound %s quarantined after %d attempts: %s", row.id, row.attempts,
                          reason)

    def run(self, stop: threading.Event, wake: threading.Event, poll_interval: float) -> None:
        while not stop.is_set():
            # Clear before looking, so a commit that lands while we work wakes the next wait.
            wake.clear()
            try:
                n = self.run_batch()
            except Exception:
                log.exception("worker batch failed")
                n = 0
            if n == 0:
                wake.wait(poll_interval)


def pending_count(engine: Engine) -> int:
    from sqlalchemy import func

    from mailgw.store.db import read_session

    with read_session(engine) as s:
        return s.scalar(select(func.count()).where(m.Inbound.state == "pending")) or 0
