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

import logging
import os
import re
import smtplib
import threading
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine, or_, select, update
from sqlalchemy.orm import Session

from mailgw.queue import now
from mailgw.settings import Relay
from mailgw.settings import Sender as SenderSettings
from mailgw.store import models as m

log = logging.getLogger(__name__)
LEASE = timedelta(minutes=5)


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


class _Relay(_PlainAddresses, smtplib.SMTP):
    pass


class _RelaySSL(_PlainAddresses, smtplib.SMTP_SSL):
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

    @staticmethod
    def _due(stamp):  # type: ignore[no-untyped-def]
        return (_OUTBOX.c.state == "pending", _OUTBOX.c.next_attempt_at <= stamp,
                or_(_OUTBOX.c.lease_until.is_(None), _OUTBOX.c.lease_until < stamp))

    def _claim(self) -> list[int]:
        # Core statements on the table, not the ORM: the sender loads no objects on its
        # happy path, and the ORM's statement handling was most of its CPU (bench/RESULTS.md).
        stamp = now()
        if not self._pg:
            # SQLite: look without the write lock first; a pass that finds nothing due (the
            # worker's wake-up came with mail another pass already took) does not queue for it.
            with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as c:
                if c.execute(select(_OUTBOX.c.id).where(*self._due(stamp)).limit(1)).first() is None:
                    return []
        with self.engine.begin() as c:
            return self._claim_in(c, stamp)

    def _claim_in(self, c, stamp, *, full_only: bool = False) -> list[int]:  # type: ignore[no-untyped-def]
        q = (
            select(_OUTBOX.c.id)
            .where(*self._due(stamp))
            .order_by(_OUTBOX.c.next_attempt_at)
            .limit(self.batch_size)
        )
        if self._pg:
            q = q.with_for_update(skip_locked=True)
        ids = list(c.execute(q).scalars())
        if full_only and len(ids) < self.batch_size:
            return []
        if ids:
            c.execute(update(_OUTBOX).where(_OUTBOX.c.id.in_(ids))
                      .values(lease_until=stamp + self.lease))
        return ids

    def run_once(self, stop: threading.Event | None = None) -> int:
        ids, self._next = self._next, []
        if not ids:
            ids = self._claim()
        if not ids:
            return 0
        conn: smtplib.SMTP | None = None
        outcomes: list[tuple[int, str | None, bool]] = []  # (id, error or None, permanent)
        done: set[int] = set()
        # The batch's mails in one read (no write lock); acknowledgements are a few KB each.
        with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as c:
            mails = {r.id: r for r in c.execute(
                select(_OUTBOX.c.id, _OUTBOX.c.mail_from, _OUTBOX.c.rcpt_tos, _OUTBOX.c.raw,
                       _OUTBOX.c.message_id).where(_OUTBOX.c.id.in_(ids)))}
        try:
            for oid in ids:
                if stop is not None and stop.is_set():
                    break  # shutting down: the rest is released below, nothing charged
                if oid not in mails:
                    continue
                _, mail_from, rcpts, raw, mid = mails.pop(oid)
                done.add(oid)
                try:
                    if self.relay is None:
                        self._write_file(oid, mid, raw)
                    else:
                        if conn is None:
                            try:
                                conn = self._connect()
                            except (OSError, smtplib.SMTPException) as exc:
                                # The relay is down: one attempt is charged to this mail only;
                                # the rest of the batch waits for the next pass, uncharged.
                                outcomes.append((oid, f"{type(exc).__name__}: {exc}", False))
                                break
                        self._send(conn, mail_from, rcpts, raw)
                except PermanentFailure as exc:
                    outcomes.append((oid, str(exc), True))
                except Exception as exc:  # noqa: BLE001 - network, relay, or anything else
                    # Counted like any failure, so a message that can never be sent ends as a
                    # dead letter instead of holding its lease forever.
                    if not isinstance(exc, OSError | smtplib.SMTPException):
                        log.exception("outbox %s: unexpected error while sending", oid)
                    conn = self._close(conn)
                    outcomes.append((oid, f"{type(exc).__name__}: {exc}", False))
                else:
                    outcomes.append((oid, None, False))
                # Results are committed in groups: one transaction (one fsync) for many mails.
                if len(outcomes) >= 25:
                    self._record(outcomes)
                    outcomes = []
        finally:
            self._close(conn)
            undone = [i for i in ids if i not in done]
            if outcomes:
                # The last results and, when a full batch is due (a backlog), its lease in
                # one transaction (one fsync, one turn of SQLite's write lock): results are
                # recorded no later than before; the lease is the one _claim would take.
                # Fewer due mails are left to a claim of its own, which waits for the lock
                # and takes what becomes due meanwhile (smaller batches cost more; bench/
                # RESULTS.md, issue 8 session 5). Not when stopping or when the relay is down.
                self._record(outcomes, claim_next=not undone
                             and not (stop is not None and stop.is_set()))
            self._release(undone)
        return len(ids)

    def release_next(self) -> None:
        """Give back a next batch leased but not to be sent (stopping)."""
        ids, self._next = self._next, []
        self._release(ids)

    def _release(self, ids: list[int]) -> None:
        if ids:
            with self.engine.begin() as c:
                c.execute(update(_OUTBOX).where(_OUTBOX.c.id.in_(ids), _OUTBOX.c.state == "pending")
                          .values(lease_until=None))

    def _connect(self) -> smtplib.SMTP:
        r = self.relay
        assert r is not None
        cls = _RelaySSL if r.ssl else _Relay
        conn = cls(r.host, r.port, timeout=r.timeout)
        if r.starttls:
            conn.starttls()
        if r.username:
            conn.login(r.username, r.password or "")
        return conn

    @staticmethod
    def _close(conn: smtplib.SMTP | None) -> None:
        if conn is not None:
            try:
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

    def _record(self, outcomes: list[tuple[int, str | None, bool]], *,
                claim_next: bool = False) -> None:
        self._next = []
        with Session(self.engine) as s, s.begin():
            # Mails the relay took: one UPDATE for the rows and one for their articles (Core).
            sent = [oid for oid, error, _ in outcomes if error is None]
            if sent:
                c = s.connection()
                c.execute(update(_OUTBOX).where(_OUTBOX.c.id.in_(sent)).values(
                    attempts=_OUTBOX.c.attempts + 1, lease_until=None, state="sent",
                    sent_at=now()))
                c.execute(update(_ARTICLES).where(_ARTICLES.c.id.in_(
                    select(_OUTBOX.c.article_id).where(_OUTBOX.c.id.in_(sent))
                )).values(delivery_state="sent"))
            for oid, error, permanent in outcomes:
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
                claimed = self._claim_in(s.connection(), now(), full_only=True)
        if claim_next:
            self._next = claimed

    @staticmethod
    def _article_state(s: Session, row: m.Outbox, state: str) -> None:
        if row.article_id:
            s.execute(update(m.Article).where(m.Article.id == row.article_id)
                      .values(delivery_state=state))

    def run(self, stop: threading.Event, wake: threading.Event) -> None:
        while not stop.is_set():
            wake.clear()
            try:
                n = self.run_once(stop)
            except Exception:
                log.exception("sender pass failed")
                n = 0
            if n == 0:
                wake.wait(self.cfg.poll_interval)
        self.release_next()
