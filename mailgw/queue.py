"""The durable inbound queue: put (intake), claim/done/quarantine (worker), replay (admin).

``put`` returns only after the row holding the raw bytes and envelope is committed, which is
the moment intake may acknowledge the message. ``GroupCommitWriter`` lets many concurrent SMTP
sessions share one commit (one fsync) without weakening that rule: each caller waits for the
commit that contains its own row.
"""

from __future__ import annotations

import asyncio
import logging
import queue as stdqueue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from datetime import UTC, datetime

from sqlalchemy import Engine, insert, update

from mailgw.intake.pipe import (
    RawBuffer,
    pg_insert_many,
    sqlite_insert,
    sqlite_insert_values,
    sqlite_values,
)
from mailgw.intake.pipe import inbound_row as _row
from mailgw.store.models import Inbound, InboundRaw
from mailgw.types import Envelope

log = logging.getLogger(__name__)
# How long the intake writer waits for sessions still receiving DATA before it commits
# (GroupCommitWriter._linger); 0 turns it off.
LINGER = 0.002


def now() -> datetime:
    return datetime.now(UTC)


def put_many(engine: Engine, envelopes: list[Envelope]) -> list[int]:
    """Insert envelopes in one transaction; returns their ids once committed."""
    with engine.begin() as conn:
        return put_in(conn, envelopes)


def put(engine: Engine, envelope: Envelope) -> int:
    return put_many(engine, [envelope])[0]


class GroupCommitWriter:
    """A thread that commits queued envelopes in groups and tells each caller its id."""

    def __init__(self, engine: Engine, *, max_group: int = 256, on_commit=None,  # type: ignore[no-untyped-def]
                 linger: float = LINGER):
        self.engine = engine
        self.max_group = max_group
        self.linger = linger
        # SMTP sessions receiving a message's DATA (mailgw/intake/smtp.py counts them, in the
        # event loop's thread; read here): their messages are about to be submitted.
        self.receiving = 0
        self.on_commit = on_commit  # called after each commit (wakes the worker)
        self._q: stdqueue.Queue[tuple[Envelope, Future[int] | _LoopFuture] | None] = stdqueue.Queue()
        self._carry = []
        self._thread = threading.Thread(target=self._run, name="intake-writer", daemon=True)
        self._thread.start()

    def submit(self, envelope: Envelope) -> Future[int]:
        fut: Future[int] = Future()
        self._q.put((envelope, fut))
        return fut

    async def aput(self, envelope: Envelope) -> int:
        # An asyncio future, answered with the rest of its group in one callback on its
        # loop: one wake-up of the loop a commit instead of one a message (a thread-safe
        # call per future is a write to the loop's self-pipe, in both threads' CPU).
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._q.put((envelope, _LoopFuture(loop, fut)))
        return await fut

    def close(self) -> None:
        """Commit everything already submitted, then stop."""
        self._q.put(None)
        self._thread.join()

    def _run(self) -> None:
        # This thread must never die: every SMTP session's answer depends on it.
        self._stopping = False
        while self._carry or not self._stopping:
            item = self._carry.pop(0) if self._carry else self._q.get()
            if item is None:
                break
            group = [item]
            self._take(group)
            if self.linger and self.receiving and not isinstance(item[0].raw, RawBuffer):
                self._linger(group)
            answers: list[tuple[Future[int] | _LoopFuture, int | None, BaseException | None]] = []
            try:
                if any(isinstance(env.raw, RawBuffer) for env, _ in group):
                    self._commit(group, answers)
                else:
                    self._commit_more(group, answers)
            except Exception:  # noqa: BLE001 - logged; the callers were already answered
                log.exception("intake writer: unexpected error")
            finally:
                _answer(answers)
            if self.on_commit:
                self.on_commit()
        if self._raw is not None:
            try:
                self._raw.close()  # back to the engine's pool
            except Exception:  # noqa: BLE001 - stopping; nothing is left to commit
                log.debug("intake writer: closing its connection", exc_info=True)
            self._raw = None

    _carry: list  # type: ignore[type-arg]  # taken from the queue, for the next group
    _stopping = False

    def _take(self, group: list, *, small_only: bool = False) -> None:  # type: ignore[type-arg]
        """Add what is queued to ``group`` without waiting (up to ``max_group``). With
        ``small_only``, a large message (``RawBuffer``) ends the taking and is kept for the
        next group (it needs a transaction of its own, see ``_commit``)."""
        while len(group) < self.max_group and not self._stopping:
            try:
                nxt = self._q.get_nowait()
            except stdqueue.Empty:
                break
            if nxt is None:
                self._stopping = True
                break
            if small_only and isinstance(nxt[0].raw, RawBuffer):
                self._carry.append(nxt)
                break
            group.append(nxt)

    def _linger(self, group: list) -> None:  # type: ignore[type-arg]
        """Wait up to ``linger`` for the messages of sessions still in DATA, so they share
        this commit instead of each taking the next one (and the write lock, and an fsync):
        with the lock free a group was often one or two messages of eight sessions."""
        deadline = time.monotonic() + self.linger
        while self.receiving and len(group) < self.max_group and not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                nxt = self._q.get(timeout=remaining)
            except stdqueue.Empty:
                return
            if nxt is None:
                self._stopping = True
                return
            if isinstance(nxt[0].raw, RawBuffer):
                self._carry.append(nxt)
                return
            group.append(nxt)
            self._take(group, small_only=True)

    def _commit_more(self, group: list, answers: list) -> None:  # type: ignore[type-arg]
        """Commit ``group`` and whatever else arrived while this writer waited for the write
        lock: on SQLite ``BEGIN IMMEDIATE`` waits (most of a loaded run) while sessions keep
        queueing; their messages go into this commit instead of the next, which makes the
        groups larger, the fsyncs and lock hand-overs fewer and no answer later (no linger:
        only what is already queued once the lock is held is taken). Each caller is still
        answered only after the commit that holds its row."""
        try:
            if self.engine.dialect.name == "sqlite":
                ids = self._sqlite_commit(group)
            elif self.engine.dialect.driver == "psycopg":
                ids = self._pg_commit(group)
            else:
                with self.engine.begin() as conn:
                    self._take(group, small_only=True)
                    ids = put_in(conn, [env for env, _ in group])
        except Exception as exc:
            self._failed(group, answers, exc)
            return
        answers += [(fut, inbound_id, None) for (_, fut), inbound_id in zip(group, ids, strict=True)]

    def _failed(self, group: list, answers: list, exc: Exception) -> None:  # type: ignore[type-arg]
        """A group's commit failed. One bad envelope (a value the database refuses) must not
        fail the others: a group is committed again one by one, so only that message is
        answered 451; a single message gets its 451 here."""
        if len(group) > 1:
            for one in group:
                self._commit([one], answers)
            return
        log.exception("inbound queue commit failed")
        answers.append((group[0][1], None, exc))

    _raw = None  # this thread's own store connection (_sqlite_commit, _pg_commit)

    def _sqlite_commit(self, group: list) -> list[int]:  # type: ignore[type-arg]
        """The group's transaction on this thread's own SQLite connection, held for the
        writer's life: ``BEGIN IMMEDIATE`` (the write lock is ours), then whatever queued
        meanwhile joins the group, the rows, ``COMMIT``. SQLAlchemy's connection checkout,
        begin and commit handling around each group cost the writer more CPU than SQLite's
        own begin and inserts (bench/RESULTS.md, issue 8 session 5). Durable when this
        returns, as through the engine (same pragmas: the engine's connect hook).

        The rows' values (the SHA-256 of the mail, its Message-ID, the text forms) need no
        lock: they are built before ``BEGIN IMMEDIATE`` for the group in hand, and under
        the lock only for the messages that queued while this writer waited for it."""
        if self._raw is None:
            self._raw = self.engine.raw_connection()
        conn = self._raw.driver_connection
        values = [sqlite_values(env) for env, _ in group]
        cur = conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
            try:
                self._take(group, small_only=True)
                values += [sqlite_values(env) for env, _ in group[len(values):]]
                ids = [sqlite_insert_values(conn, env, v)
                       for (env, _), v in zip(group, values, strict=True)]
                conn.commit()
            except BaseException:
                try:
                    conn.rollback()
                except Exception:  # noqa: BLE001 - a broken connection: take a new one
                    self._drop_raw()
                raise
        finally:
            cur.close()
        return ids

    def _pg_commit(self, group: list) -> list[int]:  # type: ignore[type-arg]
        """As ``_sqlite_commit``, on PostgreSQL (psycopg): this thread's own connection, so
        no checkout (with its ping) and no SQLAlchemy begin/commit per group; one INSERT a
        row sent in one pipeline. A connection the server closed is thrown away; a group that
        failed on it before its COMMIT is stored through the engine (whose pool pings)."""
        if self._raw is None:
            self._raw = self.engine.raw_connection()
        conn = self._raw.driver_connection
        committing = False
        try:
            self._take(group, small_only=True)
            ids = pg_insert_many(conn, [env for env, _ in group])
            committing = True
            conn.commit()
        except BaseException:
            try:
                conn.rollback()
            except Exception:  # noqa: BLE001 - broken: the next group takes a new one
                pass
            if not (conn.broken or conn.closed):
                raise
            self._drop_raw()
            if committing:
                raise  # the COMMIT may have been carried out: 451, the client's retry is a
                # redelivery the worker recognises (decision 5)
            # Nothing was committed on a connection the server closed (a restart): the group
            # goes through the engine, whose pool checks its connection first, as before.
            with self.engine.begin() as c:
                return put_in(c, [env for env, _ in group])
        return ids

    def _drop_raw(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            try:
                raw.invalidate()
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass

    def _commit(self, group: list, answers: list) -> None:  # type: ignore[type-arg]
        if len(group) > 1 and any(isinstance(env.raw, RawBuffer) for env, _ in group):
            # A large message's buffer is emptied once its bytes are in the row, so it
            # cannot be written a second time: it gets a transaction of its own, which no
            # other message's failure rolls back.
            for one in group:
                if isinstance(one[0].raw, RawBuffer):
                    self._commit([one], answers)
            group = [one for one in group if not isinstance(one[0].raw, RawBuffer)]
            if not group:
                return
        try:
            ids = put_many(self.engine, [env for env, _ in group])
        except Exception as exc:
            self._failed(group, answers, exc)
            return
        answers += [(fut, inbound_id, None) for (_, fut), inbound_id in zip(group, ids, strict=True)]


class _LoopFuture:
    """An asyncio future waiting in the writer's queue, with the loop it belongs to."""

    __slots__ = ("loop", "fut")

    def __init__(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[int]):
        self.loop, self.fut = loop, fut


def _answer(answers: list) -> None:  # type: ignore[type-arg]
    """Answer the callers of a group: thread futures at once, asyncio futures in one callback
    per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}  # type: ignore[type-arg]
    for waiter, result, exc in answers:
        if isinstance(waiter, _LoopFuture):
            by_loop.setdefault(waiter.loop, []).append((waiter.fut, result, exc))
        else:
            _settle(waiter, result=result, exc=exc)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_in_loop, items)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _settle_in_loop(items: list) -> None:  # type: ignore[type-arg]
    for fut, result, exc in items:
        if fut.done():  # cancelled: the client hung up; the row is committed anyway
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


def _settle(fut: Future[int], *, result: int | None = None, exc: BaseException | None = None) -> None:
    """Answer a caller. A client that hung up has cancelled its future: the row is committed
    anyway (it will be processed; the sender retries and the duplicate check catches it)."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)  # type: ignore[arg-type]
    except InvalidStateError:
        pass


def replay(engine: Engine, inbound_id: int) -> bool:
    """Put a quarantined message back into the queue; False if it is not quarantined."""
    with engine.begin() as conn:
        res = conn.execute(
            update(Inbound)
            .where(Inbound.id == inbound_id, Inbound.state == "quarantined")
            .values(state="pending", attempts=0, error=None, claimed_until=None, claimed_by=None,
                    held_since=None)
        )
        return res.rowcount == 1


def put_in(conn, envelopes: list[Envelope]) -> list[int]:  # type: ignore[no-untyped-def]
    """Insert envelopes inside the caller's open transaction (IMAP intake commits its ledger
    rows with them); durable once the caller commits. Returns the ids in order."""
    if not envelopes:
        return []
    if conn.dialect.name == "sqlite":
        # Row by row through the driver, in this transaction: SQLAlchemy cannot return the
        # ids of a multi-row INSERT in order on SQLite and ran one statement a row anyway,
        # at several times the cost of SQLite's insert (bench/RESULTS.md). A large message
        # is written in pieces (mailgw/intake/pipe.py ``RawBuffer``).
        dbapi_conn = conn.connection.driver_connection
        return [sqlite_insert(dbapi_conn, env) for env in envelopes]
    # One multi-row INSERT ... RETURNING, ids in the order of the envelopes, then their raw
    # mail (inbound_raw, decision 35), in the same transaction.
    rows = [_row(env) for env in envelopes]
    raws = [row.pop("raw") for row in rows]
    stmt = insert(Inbound).returning(Inbound.id, sort_by_parameter_order=True)
    ids = list(conn.execute(stmt, rows).scalars())
    conn.execute(insert(InboundRaw), [{"inbound_id": iid, "raw": raw}
                                      for iid, raw in zip(ids, raws, strict=True)])
    return ids
