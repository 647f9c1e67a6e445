"""The worker: claim pending inbound messages, process them, commit in groups.

A batch goes through three steps:
1. Claim: lease up to ``batch_size`` pending rows to this worker and count an attempt on
   each, committed before the batch is parsed: in a short transaction of its own (on
   SQLite only after a read without the write lock saw a claimable row) or, when a full
   batch is waiting (a backlog), at the end of the transaction that stored the previous
   batch (one write transaction a batch; decision 26). On PostgreSQL the claim is ``FOR
   UPDATE SKIP LOCKED``, so workers on any number of nodes take disjoint rows. On SQLite a
   worker woken with less than a full batch waiting first waits for the intake's next
   commits while they keep coming (each within ``LINGER_GAP``, for up to ``LINGER`` in all:
   ``_gather``): each batch has a fixed cost under the write lock.
2. Parse, outside any write transaction (SQLite has one writer; intake must not wait on it),
   and work out what ``process`` derives from the message alone (``mailgw.process.prepare``:
   its class, the parts of its text), so the store step does not do it under the lock.
3. Store: one transaction for the batch. A message marked ``done`` is marked so in the
   transaction that stores its ticket: it is processed exactly once. The batch is first
   stored without savepoints (they cost a round trip and a flush each, and almost every
   batch needs none); when a message raises an application error (parse, config,
   template), that transaction is rolled back and the batch is stored again with a
   SAVEPOINT per message, so the error rolls back that message alone and quarantines it
   with the reason while the rest of the batch commits. The rows are written per batch
   (``mailgw.batch``): ids are taken first, so nothing is flushed to learn one; the ORM
   objects are flushed when a look-up needs them or at the end, and the events, outbox,
   acknowledgement, attachment and loop-protection rows go in with one INSERT per table
   at the end; a database error therefore shows at the end of the batch, which is then
   retried a message at a time, where it shows at its message.

A database error rolls the whole batch back; its rows are released at once and, their
attempts being counted, retried one at a time. A deadlock with another worker (PostgreSQL)
is the exception: the batch is stored again once, whole, after locking in id order the
tickets its first try touched. A row whose worker crashed or hung keeps its
lease until it expires (or, on the same host, until a new worker sees the old process gone)
and is then retried alone. After ``worker.max_attempts`` claims a row is quarantined, so no
message can stop the queue, and a passing fault loses nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from functools import cache
from io import BytesIO
from typing import NamedTuple

from sqlalchemy import Engine, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from mailgw.batch import Batch
from mailgw.gctune import settle
from mailgw.mail.parse import parse_message
from mailgw.process import Context, Prepared, Quarantine, ack_recipient, prepare, process, sender_of
from mailgw.queue import now
from mailgw.store import models as m
from mailgw.store.db import read_session
from mailgw.types import ParsedMail, ParseError

log = logging.getLogger(__name__)
LEASE = timedelta(minutes=5)
# A batch is parsed whole before it is stored: its raw size is capped too, so a run of large
# messages does not hold batch_size of them in memory at once (one always fits).
BATCH_BYTES = 32 * 1024 * 1024
FORGET_AFTER_STORE = 1024 * 1024  # see _forget_large
PG_PIECE = 4 * 1024 * 1024  # see Worker._raws
# A worker woken with fewer than MIN_BATCH_SHARE of a batch waiting waits for more commits
# before it claims, as long as each comes within LINGER_GAP seconds of the last, up to LINGER
# seconds in all (SQLite; see Worker._gather).
MIN_BATCH_SHARE = 1.0
LINGER = 0.05
LINGER_GAP = 0.02
# While gathering, the claimable rows are counted again on a wake-up only if this long has
# passed since the last count (at 200 msg/s the intake commits every few ms).
LOOK_EVERY = 0.01


# The SQLite look and claim, through the driver (Worker._waiting, Worker._claim_in): the
# statements SQLAlchemy compiled from ``Worker._claimable``, parameters ("pending", the time
# as SQLAlchemy stores it, the limit). ORDER BY id as in the claim: without it, once ANALYZE
# has seen a store whose rows are all done, SQLite scans the whole table instead of the state
# index (93 ms a look at 1M messages; bench/scale.py); ``state`` a parameter as before, so the
# plan is the one tests/test_scale_plans.py checks.
_SQLITE_WHERE = ("FROM inbound WHERE inbound.state = ? AND (inbound.claimed_until IS NULL "
                 "OR inbound.claimed_until < ?) ORDER BY inbound.id LIMIT ?")
_SQLITE_LOOK = f"SELECT inbound.id {_SQLITE_WHERE}"
_SQLITE_CLAIMABLE = f"SELECT inbound.id, inbound.attempts, inbound.size {_SQLITE_WHERE}"


class _Row(NamedTuple):
    id: int
    attempts: int
    size: int


def _sqlite_time(t) -> str:  # type: ignore[no-untyped-def]
    # As SQLAlchemy stores a DateTime on SQLite: the wall time as text (compared as text).
    return t.strftime("%Y-%m-%d %H:%M:%S.%f")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, Quarantine):
        return str(exc)
    if isinstance(exc, ParseError):
        text = str(exc)
        return text if text.startswith("not an email message") else f"not an email message: {text}"
    tb = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {tb[0].filename.rsplit('/', 1)[-1]}:{tb[0].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"[:4000]


def _return_large_blocks() -> None:
    """Have glibc's malloc give large blocks back to the system when they are freed.

    By default glibc raises its mmap threshold to the size of the largest block freed (up
    to 32 MB); from then on the blocks of a large message (its bytes, SQLite's copies of the
    row, the decoded attachments) come from the heap and stay resident after use, so the
    next copy is added on top instead of reusing them: a 25 MB message peaked at 3.5x its
    size instead of 2.6x (bench/memory.py). A fixed threshold of 256 KB keeps them mapped
    only while used; mail below that size is not affected. Not glibc: nothing happens.
    """
    try:
        ctypes.CDLL(None).mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class Worker:
    def __init__(self, engine: Engine, context: Callable[[], Context], *, batch_size: int,
                 max_attempts: int, on_outbox: Callable[[], None] | None = None,
                 linger: float | None = None, linger_gap: float | None = None):
        self.engine = engine
        self.context = context  # returns the current settings + renderer (reloadable later)
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.on_outbox = on_outbox
        self.me = f"{socket.gethostname()}:{os.getpid()}"[:200]
        self._pg = engine.dialect.name == "postgresql"
        self._tickets: list[int] = []  # see run_batch
        # The next batch, claimed in the transaction that stored the last one (see _store).
        self._next: list[int] = []
        self.linger = LINGER if linger is None else linger
        self.linger_gap = min(LINGER_GAP, self.linger) if linger_gap is None else linger_gap
        self.min_batch = max(1, int(batch_size * MIN_BATCH_SHARE))
        self._wake: threading.Event | None = None  # set by run(): new rows were committed
        # When the first row this worker held back (_hold) is claimable again (monotonic).
        self._retry_at: float | None = None
        _return_large_blocks()
        release_dead_claims(engine)

    def _claimable(self, stamp):  # type: ignore[no-untyped-def]
        """The claimable rows: pending, and not leased or with a lease that ran out.

        (Decision 33 had SQLite's looks skip leased rows between looks every 10 s: reading a
        lease walked the row's overflow pages, the whole message. With the raw mail in
        ``inbound_raw`` (decision 35) the inbound row is small and a lease is read like any
        column, so every look takes leases that ran out again, on both stores.)"""
        return (m.Inbound.state == "pending",
                or_(m.Inbound.claimed_until.is_(None), m.Inbound.claimed_until < stamp))

    def _claim(self) -> list[int] | None:
        """Lease up to one batch of pending rows and count an attempt on each (committed).

        A row with attempts already counted was claimed before and not finished: its worker
        crashed, hung or hit a database error. Such a row is processed alone, so one bad
        message cannot take a batch down with it again; past ``max_attempts`` it is quarantined,
        and None says so (one message handled, none to process).

        On SQLite a read without the write lock comes first: a worker woken by a commit
        whose rows another worker already took does not queue for the one write lock (and
        its fsync) to find nothing.
        """
        stamp = now()
        # A row this worker held back (_hold) is leased until its delay ends; once due, this
        # look takes it (a lease that ran out) and ``_wait`` need not wake us for it again.
        if self._held_due():
            self._retry_at = None
        if not self._pg:
            waiting = self._waiting(stamp)
            if not waiting:
                return []
            if waiting < self.min_batch and self._wake is not None and self.linger > 0:
                self._gather(waiting)
                stamp = now()
        with Session(self.engine) as s, s.begin():
            return self._claim_in(s, stamp, first=True)

    def _waiting(self, stamp) -> int:  # type: ignore[no-untyped-def]
        """How many claimable rows wait, up to ``min_batch`` (a read, no write lock; SQLite).

        Through the driver (``_SQLITE_LOOK``): built, compiled and run by SQLAlchemy's ORM the
        look cost ~0.3 ms CPU (1 ms and more under load) for a query SQLite answers in
        0.05 ms, and a worker looks once or twice a batch and after every wake-up
        (bench/RESULTS.md, issue 8 session 7)."""
        ts = _sqlite_time(stamp)
        with self.engine.connect() as c:
            cur = c.connection.driver_connection.cursor()
            try:
                return len(cur.execute(_SQLITE_LOOK, ("pending", ts, self.min_batch)).fetchall())
            finally:
                cur.close()

    def _gather(self, waiting: int) -> None:
        """Wait up to ``linger`` for the intake's next commits while fewer than ``min_batch``
        rows wait (SQLite). Each batch's store transaction has a fixed cost under the one
        write lock (the batch's look-ups and id reads, one INSERT per table, the commit and
        its fsync); a worker that claims the one or two intake groups committed when it was
        woken stores many small batches, paying it more often per message (bench/RESULTS.md,
        issue 8 session 5: with the intake's bigger commits the workers stored more, smaller
        batches). A wake-up is a commit: the rows are counted again after each.

        The wait ends once no commit came for ``linger_gap`` (mail arrives slowly: claiming
        at once adds no more latency than needed; session 5's single wait of 20 ms) or after
        ``linger`` in all (mail arrives fast: up to 50 ms of it in one batch). At 8 SMTP
        sessions this halved the batches and cut the workers' time under the write lock
        ~12 % (bench/RESULTS.md, issue 8 session 7). The rows are counted again after a
        wake-up only ``LOOK_EVERY`` after the last count: with commits every few ms a look
        a commit was most of the gathering's CPU."""
        assert self._wake is not None
        looked = time.monotonic()
        deadline = looked + self.linger
        every = min(LOOK_EVERY, self.linger_gap / 2)
        while waiting < self.min_batch:
            left = min(self.linger_gap, deadline - time.monotonic())
            if left <= 0 or not self._wake.wait(left):
                return
            self._wake.clear()  # before counting: a commit after the count wakes the next wait
            if time.monotonic() - looked < every:
                continue
            waiting = self._waiting(now())
            looked = time.monotonic()

    def _claim_in(self, s: Session, stamp, *, first: bool) -> list[int] | None:  # type: ignore[no-untyped-def]
        """The claim, in the caller's transaction. ``first=False``: the claim of the next
        batch at the end of a store transaction (``_store``), which takes a full batch of
        fresh rows only. A row with attempts counted is left to a claim of its own (alone,
        or quarantined). Fewer rows are left too: claimed at once they made smaller batches
        (47 stores a run instead of 32-38) and more CPU a message under the lock than the
        claim transaction saved, while a claim of its own waits for the lock and takes
        what arrived meanwhile (bench/RESULTS.md, issue 8 session 5)."""
        if self._pg:
            q = (select(m.Inbound.id, m.Inbound.attempts, m.Inbound.size)
                 .where(*self._claimable(stamp))
                 .order_by(m.Inbound.id).limit(self.batch_size))
            q = q.with_for_update(skip_locked=True)
            rows = s.execute(q).all()
        else:
            # SQLite: the statements through the driver (see ``_waiting``), in the session's
            # transaction; what the ORM holds is flushed first, as its autoflush would (the
            # store's "done" marks, before the claim of the next batch looks for pending rows).
            s.flush()
            cur = s.connection().connection.driver_connection.cursor()
            try:
                rows = [_Row(*r) for r in cur.execute(
                    _SQLITE_CLAIMABLE, ("pending", _sqlite_time(stamp), self.batch_size))]
            finally:
                cur.close()
        if not rows or (not first and (rows[0].attempts or len(rows) < self.batch_size)):
            return []
        if rows[0].attempts >= self.max_attempts:
            reason = (f"processing did not complete in {rows[0].attempts} attempts "
                      "(the worker crashed, hung or hit a database error)")
            row = s.get(m.Inbound, rows[0].id)
            row.error = f"{reason}; last error: {row.error}" if row.error else reason
            row.state, row.processed_at, row.claimed_until = "quarantined", stamp, None
            s.add(m.Event(type="quarantined", inbound_id=row.id, created_at=stamp,
                          data={"reason": row.error, "attempts": row.attempts}))
            log.error("inbound %s quarantined: %s", row.id, row.error)
            return None
        if rows[0].attempts:
            ids = [rows[0].id]
        else:
            ids, total = [], 0
            for r in rows:
                total += r.size
                if r.attempts or (ids and total > BATCH_BYTES):
                    break
                ids.append(r.id)
        if self._pg:
            s.execute(update(m.Inbound).where(m.Inbound.id.in_(ids)).values(
                attempts=m.Inbound.attempts + 1, claimed_until=stamp + LEASE,
                claimed_by=self.me).execution_options(synchronize_session=False))
            return ids
        cur = s.connection().connection.driver_connection.cursor()
        try:
            cur.execute("UPDATE inbound SET attempts = attempts + 1, claimed_until = ?, "
                        f"claimed_by = ? WHERE id IN ({', '.join('?' * len(ids))})",
                        (_sqlite_time(stamp + LEASE), self.me, *ids))
        finally:
            cur.close()
        return ids

    def _parse(self, ids: list[int], ctx: Context) -> tuple[
            dict[int, ParsedMail | Exception], dict[int, bytes], dict[int, Prepared]]:
        """Parse outside the write transaction: intake (and SQLite's one writer) need not wait.
        The raw bytes are kept for the store step (classification reads a bounce's report
        from them), so they are read once. What ``process`` works out from the message
        alone (its class, the parts of its text: ``mailgw.process.prepare``) is computed
        here too, so the store step, which holds SQLite's write lock, does not; a message
        whose preparation raises is left to ``process``, which raises it there."""
        out: dict[int, ParsedMail | Exception] = {}
        prepared: dict[int, Prepared] = {}
        with read_session(self.engine) as s:
            rows = self._raws(s, ids)
            envelopes = {iid: (mail_from, rcpt_tos) for iid, mail_from, rcpt_tos in s.execute(
                _envelopes(self._pg), {"ids": ids})}
        raws: dict[int, bytes] = dict(rows)
        del rows
        for iid, raw in raws.items():
            try:
                mail = out[iid] = parse_message(raw)
            except Exception as exc:  # noqa: BLE001 - handed to process(), quarantined there
                out[iid] = exc
                continue
            if iid in envelopes:
                try:
                    prepared[iid] = prepare(mail, raw, *envelopes[iid], ctx.settings)
                except Exception:  # noqa: BLE001, S110 - process() computes it again, and raises
                    pass
        return out, raws, prepared

    def _raws(self, session: Session, ids: list[int]) -> list[tuple[int, bytes]]:
        """(id, raw bytes) of the batch, from ``inbound_raw``.

        PostgreSQL: in binary (``bytea`` as text is hex: psycopg held the hex, 2x the
        message, and its unescaped copy), and a large message in pieces of ``PG_PIECE``:
        libpq reads a whole result into its input buffer and copies it into the result, so
        one 25 MB value took 3x its size to fetch, and the connection kept the 25 MB buffer
        (issue 8, memory).
        """
        if not self._pg:
            return session.execute(select(m.InboundRaw.inbound_id, m.InboundRaw.raw)
                                   .where(m.InboundRaw.inbound_id.in_(ids))).all()
        dbapi = session.connection().connection.driver_connection
        out: list[tuple[int, bytes]] = []
        with dbapi.cursor(binary=True) as cur:
            # octet_length() of a stored bytea reads its TOAST header only.
            cur.execute("SELECT inbound_id, CASE WHEN octet_length(raw) <= %s THEN raw END "
                        "FROM inbound_raw WHERE inbound_id = ANY(%s)", [PG_PIECE, ids])
            rows = cur.fetchall()
            for iid, raw in rows:
                if raw is None:
                    buffer = BytesIO()
                    while True:
                        cur.execute("SELECT substring(raw FROM %s FOR %s) FROM inbound_raw "
                                    "WHERE inbound_id = %s", [buffer.tell() + 1, PG_PIECE, iid])
                        piece = cur.fetchone()[0]
                        buffer.write(piece)
                        if len(piece) < PG_PIECE:
                            break
                        del piece
                    raw = buffer.getvalue()  # shares the buffer: no copy
                    del buffer
                out.append((iid, raw))
        return out

    def run_batch(self) -> int:
        """Process up to one batch; returns how many messages were handled."""
        ids, self._next = self._next, []
        if not ids:
            ids = self._claim()
        if ids is None:
            return 1  # one message quarantined for its attempts
        if not ids:
            return 0
        ctx = self.context()
        parsed, raws, prepared = self._parse(ids, ctx)
        self._tickets = []  # tickets the first attempt touched (PostgreSQL)
        for attempt in (1, 2):
            self._current = None
            try:
                try:
                    self._store(ids, ctx, parsed, raws, isolate=False,
                                lock_tickets=attempt == 2, prepared=prepared)
                except DBAPIError:
                    raise
                except Exception:  # noqa: BLE001 - one message failed: again, each in a savepoint
                    self._current = None
                    self._store(ids, ctx, parsed, raws, isolate=True, prepared=prepared)
                break
            except DBAPIError as exc:
                if attempt == 1 and _transient(exc):
                    # A deadlock with another worker (two batches updating the same two
                    # tickets in opposite orders) is no message's fault: the transaction
                    # rolled back whole, the rows are still ours; store the batch once more
                    # instead of retrying each of its messages alone (bench/RESULTS.md,
                    # issue 8 session 4: up to 64 one-message batches per deadlock). The
                    # second try first locks, in id order, the tickets the first one had
                    # touched, the other worker's included: it waits for that worker's
                    # commit holding nothing, instead of deadlocking with it again.
                    log.info("batch of %d rolled back by a transient database error; "
                             "storing it again: %s", len(ids), _describe(exc))
                    continue
                reason = _describe(exc)
                log.warning("batch of %d rolled back by a database error (at inbound %s); its "
                            "messages are retried one by one: %s", len(ids), self._current,
                            reason)
                self._release(ids, self._current, reason)
                return 0
        if self.on_outbox:
            self.on_outbox()
        return len(ids)

    def _store(self, ids: list[int], ctx: Context, parsed: dict[int, ParsedMail | Exception],
               raws: dict[int, bytes], *, isolate: bool, lock_tickets: bool = False,
               prepared: dict[int, Prepared] | None = None) -> None:
        """Store the batch in one transaction. Without ``isolate`` an application error in any
        message propagates (the caller rolls back and stores again with ``isolate``, where
        each message has its own SAVEPOINT and a failing one is quarantined alone).

        When a full batch of fresh rows is waiting, the same transaction claims it once this
        one is written: one write transaction (on SQLite one ``BEGIN IMMEDIATE`` and one
        fsync) a batch instead of two. The claim commits with the ``done`` marks or rolls back
        with them; claimed rows this process does not get to are freed like any other
        claim (lease expiry, ``release_dead_claims``, ``release_next`` on a clean stop)."""
        self._next = []
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            if lock_tickets and self._pg and self._tickets:
                session.execute(select(m.Ticket.id)
                                .where(m.Ticket.id.in_(sorted(set(self._tickets))))
                                .order_by(m.Ticket.id).with_for_update(key_share=True))
            # The raw bytes were read for parsing already: not again into the write
            # transaction (a message only parsed here reads them on access, ``Inbound.raw``).
            rows = session.scalars(_batch_rows(self._pg),
                                   {"ids": ids, "me": self.me}).all()
            for row in rows:
                if row.id in raws:
                    m.keep_raw(row, raws[row.id])
            copies = _Redeliveries(session, rows, self._pg)
            batch = Batch(session, loop_window_hours=ctx.settings.loop_protection.window_hours,
                          at=now())
            batch.prepared = prepared if prepared is not None else {}
            try:
                batch.loops.prefetch(session, _ack_recipients(rows, parsed))
                batch.prefetch(session, [parsed.get(r.id) for r in rows],
                               ctx.settings.ticket_numbers, rows=rows,
                               orphan_wait=timedelta(seconds=ctx.settings.worker.orphan_reply_wait))
                if batch.held:
                    rows = self._hold(rows, batch)
                rows = _parents_first(rows, parsed)
                for row in rows:
                    self._current = row.id
                    if isolate:
                        self._process_one(session, row, ctx, parsed.get(row.id), copies, batch)
                    else:
                        process(session, row, ctx, parsed.get(row.id), redelivery=copies)
                        if self._pg and row.ticket_id is not None:
                            self._tickets.append(row.ticket_id)
                    _forget_large(row, parsed, raws, batch.prepared)
                    copies.stored(row)
                # The batch's rows go in together now: a database error here is the batch's
                # (rolled back and retried one message at a time, where it shows at its own).
                self._current = rows[0].id if len(rows) == 1 else None
                batch.write(session)  # the held rows' updates too
            finally:
                batch.close(session)
            claimed = self._claim_in(session, now(), first=False) or []
        self._next = claimed

    def _hold(self, rows: list[m.Inbound], batch: Batch) -> list[m.Inbound]:
        """Give back, unprocessed, the rows the batch holds for an original still in the
        queue (``mailgw.threader.held_back``): their attempt is not counted and they are
        claimable again after their delay; ``held_since`` records the first hold (the bound).
        Written with the batch (its flush), so a rolled-back batch holds nothing. Returns the
        rows to store."""
        stamp = now()
        keep = []
        for row in rows:
            delay = batch.held.get(row.id)
            if delay is None:
                keep.append(row)
                continue
            row.attempts = max(0, row.attempts - 1)
            row.claimed_until, row.claimed_by = stamp + delay, None
            if row.held_since is None:
                row.held_since = stamp
            log.debug("inbound %s held back %.2f s: the message it replies to is still in "
                      "the queue", row.id, delay.total_seconds())
            retry = time.monotonic() + delay.total_seconds()
            self._retry_at = retry if self._retry_at is None else min(self._retry_at, retry)
        return keep

    def _process_one(self, session: Session, row: m.Inbound, ctx: Context,
                     parsed: ParsedMail | Exception | None, copies: _Redeliveries,
                     batch: Batch) -> None:
        mark = batch.mark()
        savepoint = session.begin_nested()
        try:
            process(session, row, ctx, parsed, redelivery=copies)
            savepoint.commit()  # flushes: a database error shows at its message
        except DBAPIError:
            raise
        except Exception as exc:
            savepoint.rollback()
            batch.rollback(mark)
            reason = _describe(exc)
            log.warning("inbound %s quarantined: %s", row.id, reason)
            row.state, row.error, row.processed_at = "quarantined", reason, now()
            session.add(m.Event(type="quarantined", inbound_id=row.id, created_at=now(),
                                data={"reason": reason}))

    def _release(self, ids: list[int], failed: int | None, reason: str) -> None:
        """Give a rolled-back batch back at once (its attempts stay counted)."""
        with Session(self.engine) as s, s.begin():
            s.execute(update(m.Inbound)
                      .where(m.Inbound.id.in_(ids), m.Inbound.state == "pending")
                      .values(claimed_until=None, claimed_by=None))
            if failed is not None:
                s.execute(update(m.Inbound).where(m.Inbound.id == failed).values(error=reason))

    def run(self, stop: threading.Event, wake: threading.Event, poll_interval: float) -> None:
        self._wake = wake
        settle()  # started and configured: what the process holds now lives as long as it
        while not stop.is_set():
            # Clear before looking, so a commit that lands while we work wakes the next wait.
            wake.clear()
            try:
                n = self.run_batch()
            except Exception:
                log.exception("worker batch failed")
                n = 0
            if n == 0:
                wake.wait(self._wait(poll_interval))
        self.release_next()

    def _held_due(self) -> bool:
        """A row this worker held back is claimable again."""
        return self._retry_at is not None and time.monotonic() >= self._retry_at

    def _wait(self, poll_interval: float) -> float:
        """How long to wait for a wake-up with nothing to do: the poll interval, or less when a
        row this worker held back becomes claimable sooner (no commit would wake us for it)."""
        if self._retry_at is None:
            return poll_interval
        left = self._retry_at - time.monotonic()
        if left <= 0:  # due (while we looked): look again now (_claim clears it)
            return 0
        return min(poll_interval, left + 0.001)

    def release_next(self) -> None:
        """Free the rows claimed for a next batch that will not be run (stopping). Their
        attempt stays counted, as for any claim given back."""
        ids, self._next = self._next, []
        if ids:
            with Session(self.engine) as s, s.begin():
                s.execute(update(m.Inbound)
                          .where(m.Inbound.id.in_(ids), m.Inbound.state == "pending",
                                 m.Inbound.claimed_by == self.me)
                          .values(claimed_until=None, claimed_by=None))


# The statements of a batch's reads, built once per store kind (building one and its cache
# key cost more than running it: bench/RESULTS.md, issue 8 session 7); their lists are
# ``mailgw.batch.in_list``s.
@cache
def _batch_rows(pg: bool):  # type: ignore[no-untyped-def]
    """The rows ``Worker._store`` stores (still pending and this worker's)."""
    from sqlalchemy import bindparam

    from mailgw.batch import in_list

    q = (select(m.Inbound)
         .where(in_list(m.Inbound.id, "ids", pg),
                m.Inbound.state == "pending",
                m.Inbound.claimed_by == bindparam("me", type_=m.Inbound.claimed_by.type))
         .order_by(m.Inbound.id))
    return q.with_for_update(skip_locked=True) if pg else q


@cache
def _envelopes(pg: bool):  # type: ignore[no-untyped-def]
    """The envelopes ``Worker._parse`` reads."""
    from mailgw.batch import in_list

    return (select(m.Inbound.id, m.Inbound.mail_from, m.Inbound.rcpt_tos)
            .where(in_list(m.Inbound.id, "ids", pg)))


@cache
def _copies(pg: bool):  # type: ignore[no-untyped-def]
    """The done messages with the same SHA-256 (``_Redeliveries``)."""
    from mailgw.batch import in_list

    return (select(m.Inbound.id, m.Inbound.sha256, m.Inbound.rcpt_tos, m.Inbound.queue)
            .where(in_list(m.Inbound.sha256, "shas", pg), m.Inbound.state == "done")
            .order_by(m.Inbound.id))


def _parents_first(rows: list[m.Inbound],
                   parsed: dict[int, ParsedMail | Exception | None]) -> list[m.Inbound]:
    """The batch's rows in the order to store them (``mailgw.threader.parents_first``)."""
    from mailgw.threader import parents_first

    if len(rows) < 2:
        return rows
    by_id = {row.id: row for row in rows}
    order = parents_first([(row.id, mail if isinstance(mail := parsed.get(row.id), ParsedMail)
                            else None) for row in rows])
    return [by_id[i] for i in order]


def _transient(exc: DBAPIError) -> bool:
    """A deadlock or serialization failure (PostgreSQL): the transaction may simply be run
    again."""
    return getattr(exc.orig, "sqlstate", None) in ("40P01", "40001")


def _ack_recipients(rows: list[m.Inbound],
                    parsed: dict[int, ParsedMail | Exception | None]) -> set[str]:
    """Where the batch's acknowledgements would go: their loop counts are asked at once."""
    out = set()
    for row in rows:
        mail = parsed.get(row.id)
        if isinstance(mail, ParsedMail):
            out.add(ack_recipient(mail, sender_of(mail, row)).strip().lower())
    return out


def _forget_large(row: m.Inbound, parsed: dict[int, ParsedMail | Exception | None],
                  raws: dict[int, bytes], prepared: dict[int, Prepared]) -> None:
    """Let go of a large message's bytes and parsed form once it is stored, before the batch's
    flush and commit: they need not be held while the rest of the batch is written (issue 8:
    a 25 MB message under 3x its size; before decision 35 SQLite also built the updated
    inbound row, raw included, in that flush). Should the batch be stored again, it is
    parsed again."""
    raw = raws.get(row.id)
    if raw is not None and len(raw) >= FORGET_AFTER_STORE:
        del raws[row.id]
        parsed[row.id] = None
        prepared.pop(row.id, None)
        m.keep_raw(row, None)


class _Redeliveries:
    """The redelivery check of ``mailgw.process`` for a whole batch: one query for the
    processed copies of every message in it (``sha256 IN (...)``), and the batch's own
    messages added as they are stored, so a second copy in the same batch is found too.
    On PostgreSQL the advisory locks of ``_redelivery_of`` are taken here for the batch,
    in sorted order (two workers never wait on each other in a cycle), before the query."""

    def __init__(self, session: Session, rows: list[m.Inbound], pg: bool):
        self.done: dict[str, list[tuple[int, list[str], str | None]]] = {}
        shas = sorted({r.sha256 for r in rows})
        if not shas:
            return
        if pg:
            # One statement, the locks taken in key order: PostgreSQL evaluates a volatile
            # function of the output list after the sort (ORDER BY).
            keys = sorted({int(sha[:15], 16) for sha in shas})
            session.connection().exec_driver_sql(
                "SELECT pg_advisory_xact_lock(k) FROM unnest(%(keys)s::bigint[]) AS k "
                "ORDER BY k", {"keys": keys})
        for other_id, sha, rcpts, queue in session.execute(_copies(pg), {"shas": shas}):
            self.done.setdefault(sha, []).append((other_id, sorted(rcpts), queue))

    def __call__(self, session: Session, row: m.Inbound) -> int | None:
        rcpts = sorted(row.rcpt_tos)
        for other_id, other_rcpts, queue in self.done.get(row.sha256, ()):
            if other_id != row.id and other_rcpts == rcpts and queue == row.queue:
                return other_id
        return None

    def stored(self, row: m.Inbound) -> None:
        if row.state == "done":
            self.done.setdefault(row.sha256, []).append((row.id, sorted(row.rcpt_tos), row.queue))


def release_dead_claims(engine: Engine, *, own: bool = True) -> int:
    """Free the leases of workers on this host that no longer run (crashed or killed), so a
    restart goes on at once instead of waiting for the leases to expire. Leases of other
    hosts expire on their own. A worker starting frees its own pid's too (left by an earlier
    process with the same pid); the gateway's periodic housekeeping passes ``own=False``,
    since this process's worker may be holding live claims."""
    host = socket.gethostname()
    freed = 0
    with Session(engine) as s, s.begin():
        owners = s.scalars(select(m.Inbound.claimed_by).distinct().where(
            m.Inbound.state == "pending", m.Inbound.claimed_by.like(f"{host}:%"))).all()
        for owner in owners:
            pid = int(owner.rsplit(":", 1)[1])
            if pid == os.getpid() and not own:
                continue
            if pid != os.getpid() and _alive(pid):
                continue
            freed += s.execute(update(m.Inbound).where(
                m.Inbound.state == "pending", m.Inbound.claimed_by == owner
            ).values(claimed_until=None, claimed_by=None)).rowcount
    if freed:
        log.info("released %d message(s) claimed by workers that are gone", freed)
    return freed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pending_count(engine: Engine) -> int:
    from sqlalchemy import func

    from mailgw.store.db import read_session

    with read_session(engine) as s:
        return s.scalar(select(func.count()).where(m.Inbound.state == "pending")) or 0
