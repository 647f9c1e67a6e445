"""The sender loop: hand due outbox rows to the SMTP relay, with retries and backoff.

A row is claimed with a lease (``lease_until``) committed before any network I/O, so no
database lock is held while talking to a slow relay, and a sender that dies mid-send leaves a
lease that simply expires. Delivery is at-least-once: a crash after the relay accepted a
message but before ``sent`` is committed sends it again, which the Message-ID lets clients
and relays de-duplicate.

With no relay configured (the embedded default), each message is written atomically as an
``.eml`` file into ``store/outbox/`` so a newcomer can read what mailgw would have sent.
"""

from __future__ import annotations

import json
import logging
import os
import re
import smtplib
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from mailgw.queue import now
from mailgw.settings import Relay
from mailgw.settings import Sender as SenderSettings
from mailgw.store import models as m

log = logging.getLogger(__name__)
LEASE = timedelta(minutes=5)
# A relay connection is kept from one pass to the next while mail keeps coming: up to this
# many seconds idle (and at most a batch's worth of mails), checked with NOOP before use.
REUSE_IDLE = 10.0
# How long the NOOP before reuse and the QUIT of a kept session may wait for the relay, and
# how long a stopping sender lets a relay session in progress (a DATA's answer) run on.
QUICK = 2.0


_OUTBOX = m.Outbox.__table__
_ARTICLES = m.Article.__table__

# An address that smtplib's quoteaddr() returns as "<address>" unchanged: a dot-atom local
# part and dot-separated labels, ASCII (tests/test_smtp_fast.py compares the two).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDR = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")


class _PlainAddresses:
    """``MAIL FROM`` and ``RCPT TO`` without ``email.utils.parseaddr`` for plain addresses.

    smtplib quotes every address through the RFC 2822 address parser (a fifth of the
    sender's CPU in the profile); an address of the plain form quotes to itself in angle
    brackets. Other addresses, and SMTPUTF8 (which switches the command encoding), take
    smtplib's own way; ESMTP parameters (SIZE=) follow the address as smtplib writes them.
    """

    def mail(self, sender: str, options=()):  # type: ignore[no-untyped-def]
        if not _PLAIN_ADDR.fullmatch(sender) or any(o.lower() == "smtputf8" for o in options):
            return super().mail(sender, options)  # type: ignore[misc]
        self.putcmd("mail", f"FROM:<{sender}>{self._params(options)}")  # type: ignore[attr-defined]
        return self.getreply()  # type: ignore[attr-defined]

    def rcpt(self, recip: str, options=()):  # type: ignore[no-untyped-def]
        if not _PLAIN_ADDR.fullmatch(recip):
            return super().rcpt(recip, options)  # type: ignore[misc]
        self.putcmd("rcpt", f"TO:<{recip}>{self._params(options)}")  # type: ignore[attr-defined]
        return self.getreply()  # type: ignore[attr-defined]

    def _params(self, options) -> str:  # type: ignore[no-untyped-def]
        # ESMTP parameters go only to a server that answered EHLO (as smtplib does).
        return " " + " ".join(options) if options and self.does_esmtp else ""  # type: ignore[attr-defined]


class _Mail(NamedTuple):
    """A leased outbox row's content: what the pass sends and records."""

    id: int
    article_id: int | None
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    message_id: str


def _sqlite_time(t) -> str:  # type: ignore[no-untyped-def]
    # As SQLAlchemy stores a DateTime on SQLite: the wall time as text (compared as text).
    return t.strftime("%Y-%m-%d %H:%M:%S.%f")


def _marks(n: int) -> str:
    return ", ".join("?" * n)


class _SQL:
    """The sender's statements on its happy path, for the driver of each dialect.

    Due: pending, ``next_attempt_at`` passed and no lease running; the oldest due first (the
    partial index ``ix_outbox_due``). tests/test_sender.py and tests/test_write_lock.py run
    them on both stores."""

    _DUE = ("state = 'pending' AND next_attempt_at <= {p} "
            "AND (lease_until IS NULL OR lease_until < {p})")
    _COLS = "id, article_id, mail_from, rcpt_tos, raw, message_id, next_attempt_at"

    sqlite_look = f"SELECT id FROM outbox WHERE {_DUE.format(p='?')} LIMIT 1"
    sqlite_due_ids = (f"SELECT id FROM outbox WHERE {_DUE.format(p='?')} "
                      "ORDER BY next_attempt_at LIMIT ?")
    sqlite_claim = (f"UPDATE outbox SET lease_until = ? WHERE id IN ({sqlite_due_ids}) "
                    f"RETURNING {_COLS}")

    @staticmethod
    def sqlite_lease_ids(n: int) -> str:
        return (f"UPDATE outbox SET lease_until = ? WHERE id IN ({_marks(n)}) "
                f"RETURNING {_SQL._COLS}")

    @staticmethod
    def sqlite_sent(n: int) -> str:
        return ("UPDATE outbox SET attempts = attempts + 1, lease_until = NULL, state = 'sent', "
                f"sent_at = ? WHERE id IN ({_marks(n)})")

    @staticmethod
    def sqlite_article_sent(n: int) -> str:
        return f"UPDATE articles SET delivery_state = 'sent' WHERE id IN ({_marks(n)})"

    pg_due_ids = (f"SELECT id FROM outbox WHERE {_DUE.format(p='%s')} "
                  "ORDER BY next_attempt_at LIMIT %s FOR UPDATE SKIP LOCKED")
    # A CTE runs once: the rows it locked are the rows leased.
    pg_claim = (f"WITH due AS ({pg_due_ids}) UPDATE outbox SET lease_until = %s FROM due "
                f"WHERE outbox.id = due.id RETURNING "
                + ", ".join(f"outbox.{c}" for c in _COLS.split(", ")))
    pg_lease_ids = (f"UPDATE outbox SET lease_until = %s WHERE id = ANY(%s::bigint[]) "
                    f"RETURNING {_COLS}")
    # The rows and their articles in one statement (a data-modifying WITH runs whether or not
    # its rows are read): one execution and round trip a record instead of two.
    pg_sent = ("WITH a AS (UPDATE articles SET delivery_state = 'sent' "
               "WHERE id = ANY(%s::bigint[])) "
               "UPDATE outbox SET attempts = attempts + 1, lease_until = NULL, state = 'sent', "
               "sent_at = %s WHERE id = ANY(%s::bigint[])")


class _KnownSocket(smtplib.SMTP):
    """The TCP socket is ``self.sock`` before it connects, not once it has: a stopping sender
    (``Sender._cut_when_stopped``) can then shut down a connect the relay's host never
    answers (a firewall that drops, a host gone), which would otherwise wait the relay's
    timeout. What ``socket.create_connection`` does otherwise: every address in turn."""

    def _get_socket(self, host, port, timeout):  # type: ignore[no-untyped-def]
        if timeout is not None and not timeout:
            raise ValueError("Non-blocking socket (timeout=0) is not supported")
        err: OSError | None = None
        for af, socktype, proto, _name, addr in socket.getaddrinfo(host, port, 0,
                                                                   socket.SOCK_STREAM):
            sock = socket.socket(af, socktype, proto)
            self.sock = sock
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                    sock.settimeout(timeout)
                if self.source_address:
                    sock.bind(self.source_address)
                sock.connect(addr)
                return sock
            except OSError as exc:
                err = exc
                sock.close()
                self.sock = None
        raise err if err is not None else OSError(f"no address for {host}")


class _Relay(_PlainAddresses, _KnownSocket):
    pass


# SMTP_SSL wraps what SMTP._get_socket returns: _KnownSocket comes between the two.
class _RelaySSL(_PlainAddresses, smtplib.SMTP_SSL, _KnownSocket):
    pass


class PermanentFailure(Exception):
    """The relay refused the message for good (5xx): retrying cannot help."""


class Sender:
    def __init__(self, engine: Engine, relay: Relay | None, outbox_dir: Path,
                 cfg: SenderSettings, batch_size: int = 100):
        self.engine = engine
        self.relay = relay
        self.outbox_dir = outbox_dir
        self.cfg = cfg
        self.batch_size = batch_size
        # A lease must outlast the slowest pass over a batch, or another node would take rows
        # that are still being sent.
        per_mail = relay.timeout if relay else 1.0
        self.lease = max(LEASE, timedelta(seconds=2 * batch_size * per_mail))
        self._pg = engine.dialect.name == "postgresql"
        # The next batch, leased in the transaction that recorded the last one (_record).
        self._next: list[int] = []
        # The content of leased mails not sent yet, read by the statement that leased them.
        self._mails: dict[int, _Mail] = {}
        # The relay connection kept after a pass (_open), its mails and its last use.
        self._conn: smtplib.SMTP | None = None
        self._conn_mails = 0
        self._conn_at = 0.0
        # The relay session a pass is using (_busy), and whether a stop cut it (_cut).
        self._busy: smtplib.SMTP | None = None
        self._cut = threading.Event()

    def _claim(self) -> list[int]:
        # Statements through the database driver, not SQLAlchemy: the sender runs a few a
        # pass, and building and compiling them was most of its CPU (bench/RESULTS.md, issue
        # 8 session 5). The statements are in _SQL, one set per dialect.
        stamp = now()
        if not self._pg:
            # SQLite: look without the write lock first; a pass that finds nothing due (the
            # worker's wake-up came with mail another pass already took) does not queue for it.
            with self.engine.connect() as c:
                cur = c.connection.driver_connection.cursor()
                try:
                    ts = _sqlite_time(stamp)
                    if cur.execute(_SQL.sqlite_look, (ts, ts)).fetchone() is None:
                        return []
                finally:
                    cur.close()
        with self.engine.begin() as c:
            return self._claim_in(c, stamp)

    def _claim_in(self, c, stamp, *, full_only: bool = False) -> list[int]:  # type: ignore[no-untyped-def]
        """Lease up to a batch of due mails in the transaction of ``c`` and keep their
        content for the pass (``_mails``); returns their ids, oldest due first. The lease
        and the read are one statement (``UPDATE ... RETURNING``). ``full_only``: only a
        full batch, else nothing."""
        cur = c.connection.driver_connection.cursor()
        try:
            until = stamp + self.lease
            if self._pg:
                due: tuple = (stamp, stamp, self.batch_size)  # type: ignore[type-arg]
                if full_only:
                    ids = [r[0] for r in cur.execute(_SQL.pg_due_ids, due).fetchall()]
                    if len(ids) < self.batch_size:
                        return []
                    rows = cur.execute(_SQL.pg_lease_ids, (until, ids)).fetchall()
                else:
                    rows = cur.execute(_SQL.pg_claim, (*due, until)).fetchall()
            else:
                ts = _sqlite_time(stamp)
                due = (ts, ts, self.batch_size)
                if full_only:
                    ids = [r[0] for r in cur.execute(_SQL.sqlite_due_ids, due).fetchall()]
                    if len(ids) < self.batch_size:
                        return []
                    rows = cur.execute(_SQL.sqlite_lease_ids(len(ids)),
                                       (_sqlite_time(until), *ids)).fetchall()
                else:
                    rows = cur.execute(_SQL.sqlite_claim, (_sqlite_time(until), *due)).fetchall()
        finally:
            cur.close()
        # RETURNING gives no order: oldest due first, as the claim chose them.
        rows.sort(key=lambda r: (r[6], r[0]))
        pg = self._pg
        for r in rows:
            oid, article_id, mail_from, rcpts, raw, mid, _ = r
            self._mails[oid] = _Mail(oid, article_id, mail_from,
                                     rcpts if pg else json.loads(rcpts), bytes(raw), mid)
        return [r[0] for r in rows]

    def _read(self, ids: list[int]) -> None:
        """The content of leased mails not read with their lease (``_mails``)."""
        with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as c:
            for r in c.execute(
                    select(_OUTBOX.c.id, _OUTBOX.c.article_id, _OUTBOX.c.mail_from,
                           _OUTBOX.c.rcpt_tos, _OUTBOX.c.raw, _OUTBOX.c.message_id)
                    .where(_OUTBOX.c.id.in_(ids))):
                self._mails[r.id] = _Mail(*r)

    def run_once(self, stop: threading.Event | None = None) -> int:
        ids, self._next = self._next, []
        if not ids:
            ids = self._claim()
        if not ids:
            return 0
        conn: smtplib.SMTP | None = None
        # (id, error or None, permanent, article id)
        outcomes: list[tuple[int, str | None, bool, int | None]] = []
        done: set[int] = set()
        # The batch's mails were read with their lease (acknowledgements are a few KB each).
        mails, self._mails = self._mails, {}
        missing = [i for i in ids if i not in mails]
        if missing:
            self._mails = mails
            self._read(missing)
            mails, self._mails = self._mails, {}
        try:
            for oid in ids:
                if stop is not None and stop.is_set():
                    break  # shutting down: the rest is released below, nothing charged
                if oid not in mails:
                    continue
                _, article_id, mail_from, rcpts, raw, mid = mails.pop(oid)
                done.add(oid)
                try:
                    if self.relay is None:
                        self._write_file(oid, mid, raw)
                    else:
                        if conn is not None and self._conn_mails >= self.batch_size:
                            conn = self._close(conn)  # a batch's worth: a new session
                        if conn is None:
                            try:
                                conn = self._open()
                            except (OSError, smtplib.SMTPException) as exc:
                                if self._cut.is_set():  # stopping: no greeting in time
                                    done.discard(oid)
                                    break
                                # The relay is down: one attempt is charged to this mail only;
                                # the rest of the batch waits for the next pass, uncharged.
                                outcomes.append((oid, f"{type(exc).__name__}: {exc}", False,
                                                 article_id))
                                break
                        self._conn_mails += 1
                        self._send(conn, mail_from, rcpts, raw)
                except PermanentFailure as exc:
                    outcomes.append((oid, str(exc), True, article_id))
                except Exception as exc:  # noqa: BLE001 - network, relay, or anything else
                    if self._cut.is_set():
                        # Stopping, and the relay did not answer in time (_cut_when_stopped):
                        # not an attempt; the mail is released below and sent after the
                        # restart (at least once: the relay may have taken it).
                        done.discard(oid)
                        conn = self._close(conn, quick=True)
                        break
                    # Counted like any failure, so a message that can never be sent ends as a
                    # dead letter instead of holding its lease forever.
                    if not isinstance(exc, OSError | smtplib.SMTPException):
                        log.exception("outbox %s: unexpected error while sending", oid)
                    conn = self._close(conn)
                    outcomes.append((oid, f"{type(exc).__name__}: {exc}", False, article_id))
                else:
                    outcomes.append((oid, None, False, article_id))
                # Results are committed in groups: one transaction (one fsync) for many mails.
                if len(outcomes) >= 25:
                    self._record(outcomes)
                    outcomes = []
        finally:
            if conn is not None and not (stop is not None and stop.is_set()):
                # Kept for the next pass (the next worker batch's acknowledgements come in
                # milliseconds under load): no new TCP and SMTP session each pass.
                self._conn, self._conn_at = conn, time.monotonic()
            else:
                self._close(conn, quick=True)  # stopping
            undone = [i for i in ids if i not in done]
            if outcomes:
                # The last results and, when a full batch is due (a backlog), its lease in
                # one transaction (one fsync, one turn of SQLite's write lock): results are
                # recorded no later than before; the lease is the one _claim would take.
                # Fewer due mails are left to a claim of its own, which waits for the lock
                # and takes what becomes due meanwhile (smaller batches cost more; bench/
                # RESULTS.md, issue 8 session 5); on PostgreSQL they are leased here too
                # (``_record``). Not when stopping or when the relay is down.
                self._record(outcomes, claim_next=not undone
                             and not (stop is not None and stop.is_set()))
            self._release(undone)
        return len(ids)

    def release_next(self) -> None:
        """Give back a next batch leased but not to be sent (stopping)."""
        ids, self._next = self._next, []
        self._mails = {}
        self._release(ids)

    def _release(self, ids: list[int]) -> None:
        if ids:
            with self.engine.begin() as c:
                c.execute(update(_OUTBOX).where(_OUTBOX.c.id.in_(ids), _OUTBOX.c.state == "pending")
                          .values(lease_until=None))

    def _open(self) -> smtplib.SMTP:
        """The connection kept from the last pass if it is fresh and the relay still answers
        ``NOOP`` (a relay may close an idle session; then nothing was sent on it and no
        attempt is charged), else a new one."""
        conn, self._conn = self._conn, None
        self._busy = conn
        if conn is not None:
            if (self._conn_mails < self.batch_size
                    and time.monotonic() - self._conn_at < REUSE_IDLE):
                try:
                    # A relay that stopped answering must not hold the pass for its timeout.
                    conn.sock.settimeout(min(self.relay.timeout, QUICK))  # type: ignore[union-attr]
                    if conn.noop()[0] == 250:
                        conn.sock.settimeout(self.relay.timeout)  # type: ignore[union-attr]
                        return conn
                except (OSError, smtplib.SMTPException, AttributeError):
                    pass
            self._close(conn, quick=True)
        self._conn_mails = 0
        return self._connect()

    def close_relay(self) -> None:
        """Close the relay connection kept between passes (idle or stopping): ``QUIT``, but
        without waiting long for a relay that no longer answers (a stop must not hang)."""
        self._conn = self._close(self._conn, quick=True)

    def _connect(self) -> smtplib.SMTP:
        r = self.relay
        assert r is not None
        cls = _RelaySSL if r.ssl else _Relay
        # Known as the session in use before it connects (its greeting is waited for inside
        # the constructor), so that a stop can cut a relay that does not greet.
        conn = cls.__new__(cls)
        self._busy = conn
        conn.__init__(r.host, r.port, timeout=r.timeout)  # type: ignore[misc]
        if r.starttls:
            conn.starttls()
        if r.username:
            conn.login(r.username, r.password or "")
        return conn

    @staticmethod
    def _close(conn: smtplib.SMTP | None, *, quick: bool = False) -> None:
        if conn is not None:
            try:
                if quick and conn.sock is not None:
                    conn.sock.settimeout(min(conn.sock.gettimeout() or QUICK, QUICK))
                conn.quit()
            except (OSError, smtplib.SMTPException):
                conn.close()
        return None

    @staticmethod
    def _send(conn: smtplib.SMTP, mail_from: str, rcpts: list[str], raw: bytes) -> None:
        options: list[str] = []
        if not all(a.isascii() for a in [mail_from, *rcpts]):
            # RFC 6531: an internationalised address needs a relay that offers SMTPUTF8.
            conn.ehlo_or_helo_if_needed()
            if not conn.has_extn("smtputf8"):
                raise PermanentFailure("the address needs SMTPUTF8, which the relay does not offer")
            options.append("SMTPUTF8")
        try:
            refused = conn.sendmail(mail_from, rcpts, raw, mail_options=options)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            if all(500 <= c < 600 for c in codes):
                raise PermanentFailure(f"all recipients refused: {exc.recipients}") from exc
            raise
        except smtplib.SMTPResponseException as exc:
            if 500 <= exc.smtp_code < 600:
                raise PermanentFailure(f"{exc.smtp_code} {exc.smtp_error!r}") from exc
            raise
        if refused:
            log.warning("relay refused some recipients: %s", refused)

    def _write_file(self, oid: int, message_id: str, raw: bytes) -> None:
        self.outbox_dir.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "._-@" else "_" for c in message_id)[:150]
        final = self.outbox_dir / f"{oid:08d}-{safe}.eml"
        tmp = final.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def _record(self, outcomes: list[tuple[int, str | None, bool, int | None]], *,
                claim_next: bool = False) -> None:
        self._next = []
        with Session(self.engine) as s, s.begin():
            # Mails the relay took: one UPDATE for the rows and one for their articles (one
            # statement on PostgreSQL), through the driver (_SQL).
            sent = [oid for oid, error, _, _ in outcomes if error is None]
            if sent:
                articles = [a for oid, error, _, a in outcomes if error is None and a is not None]
                cur = s.connection().connection.driver_connection.cursor()
                try:
                    if self._pg:
                        cur.execute(_SQL.pg_sent, (articles, now(), sent))
                    else:
                        cur.execute(_SQL.sqlite_sent(len(sent)), (_sqlite_time(now()), *sent))
                        if articles:
                            cur.execute(_SQL.sqlite_article_sent(len(articles)), articles)
                finally:
                    cur.close()
            for oid, error, permanent, _ in outcomes:
                if error is None:
                    continue
                row = s.get(m.Outbox, oid)
                if row is None:
                    continue
                row.attempts += 1
                row.lease_until = None
                if permanent or row.attempts >= self.cfg.max_attempts:
                    row.state, row.last_error = "dead", error[:4000]
                    self._article_state(s, row, "failed")
                    s.add(m.Event(type="delivery_failed", ticket_id=row.ticket_id,
                                  article_id=row.article_id, created_at=now(),
                                  data={"error": error[:1000], "attempts": row.attempts}))
                    log.error("outbox %s dead after %d attempt(s): %s", oid, row.attempts, error)
                else:
                    delay = min(self.cfg.backoff_initial * 2 ** (row.attempts - 1),
                                self.cfg.backoff_max)
                    row.last_error = error[:4000]
                    row.next_attempt_at = now() + timedelta(seconds=delay)
                    log.warning("outbox %s attempt %d failed, retry in %.0fs: %s", oid,
                                row.attempts, delay, error)
            if claim_next:
                s.flush()
                # SQLite: a full batch only (above); PostgreSQL, with no one write lock to
                # wait for, leases whatever is due: a pass under load is then one
                # transaction (one commit, one checkout) instead of a lease and a record.
                claimed = self._claim_in(s.connection(), now(), full_only=not self._pg)
        if claim_next:
            self._next = claimed

    @staticmethod
    def _article_state(s: Session, row: m.Outbox, state: str) -> None:
        if row.article_id:
            s.execute(update(m.Article).where(m.Article.id == row.article_id)
                      .values(delivery_state=state))

    def _cut_when_stopped(self, stop: threading.Event, ended: threading.Event) -> None:
        """Once ``stop`` is set, give the pass in progress ``QUICK`` seconds; a relay session
        still waiting for the relay then (a DATA's answer, a greeting: the relay's timeout is
        30 s by default) is shut down, so a gateway stopping does not hang on a relay that
        stopped answering. The mail in flight is released uncharged (``run_once``)."""
        stop.wait()
        if ended.wait(QUICK):
            return
        # Until the pass ends: a session being opened has no socket for a moment, and one
        # wait may follow another (a session's QUIT, then a new connect).
        warned = False
        while True:
            sock = getattr(self._busy, "sock", None)
            if sock is not None:
                self._cut.set()
                if not warned:
                    log.warning("stopping: the relay has not answered for %.0f s; closing "
                                "its session", QUICK)
                    warned = True
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if ended.wait(0.2):
                return

    def run(self, stop: threading.Event, wake: threading.Event) -> None:
        ended = threading.Event()
        if self.relay is not None:
            threading.Thread(target=self._cut_when_stopped, args=(stop, ended),
                             name="sender-stop", daemon=True).start()
        try:
            self._run(stop, wake)
        finally:
            ended.set()

    def _run(self, stop: threading.Event, wake: threading.Event) -> None:
        while not stop.is_set():
            wake.clear()
            try:
                n = self.run_once(stop)
            except Exception:
                log.exception("sender pass failed")
                n = 0
            if n == 0 and not wake.wait(self.cfg.poll_interval):
                self.close_relay()  # a whole poll interval without mail
        self.close_relay()
        self.release_next()
