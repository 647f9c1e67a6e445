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

    def _claim(self) -> list[int]:
        stamp = now()
        with Session(self.engine) as s, s.begin():
            q = (
                select(m.Outbox.id)
                .where(m.Outbox.state == "pending", m.Outbox.next_attempt_at <= stamp,
                       or_(m.Outbox.lease_until.is_(None), m.Outbox.lease_until < stamp))
                .order_by(m.Outbox.next_attempt_at)
                .limit(self.batch_size)
            )
            if self.engine.dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)
            ids = list(s.scalars(q))
            if ids:
                s.execute(update(m.Outbox).where(m.Outbox.id.in_(ids))
                          .values(lease_until=stamp + LEASE))
        return ids

    def run_once(self) -> int:
        ids = self._claim()
        if not ids:
            return 0
        conn: smtplib.SMTP | None = None
        try:
            for oid in ids:
                with Session(self.engine) as s:
                    row = s.get(m.Outbox, oid)
                    if row is None:
                        continue
                    mail_from, rcpts, raw, mid = row.mail_from, row.rcpt_tos, row.raw, row.message_id
                try:
                    if self.relay is None:
                        self._write_file(oid, mid, raw)
                    else:
                        conn = conn or self._connect()
                        self._send(conn, mail_from, rcpts, raw)
                except PermanentFailure as exc:
                    self._failed(oid, str(exc), permanent=True)
                except (OSError, smtplib.SMTPException) as exc:
                    conn = self._close(conn)
                    self._failed(oid, f"{type(exc).__name__}: {exc}", permanent=False)
                except Exception as exc:  # noqa: BLE001 - e.g. an address smtplib cannot encode
                    # Counted like any failure, so a message that can never be sent ends as a
                    # dead letter instead of blocking its lease forever.
                    log.exception("outbox %s: unexpected error while sending", oid)
                    conn = self._close(conn)
                    self._failed(oid, f"{type(exc).__name__}: {exc}", permanent=False)
                else:
                    self._sent(oid)
        finally:
            self._close(conn)
        return len(ids)

    def _connect(self) -> smtplib.SMTP:
        r = self.relay
        assert r is not None
        cls = smtplib.SMTP_SSL if r.ssl else smtplib.SMTP
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
        try:
            refused = conn.sendmail(mail_from, rcpts, raw)
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

    def _sent(self, oid: int) -> None:
        with Session(self.engine) as s, s.begin():
            row = s.get(m.Outbox, oid)
            if row is None:
                return
            row.state, row.sent_at, row.lease_until = "sent", now(), None
            row.attempts += 1
            if row.article_id:
                s.execute(update(m.Article).where(m.Article.id == row.article_id)
                          .values(delivery_state="sent"))

    def _failed(self, oid: int, error: str, *, permanent: bool) -> None:
        with Session(self.engine) as s, s.begin():
            row = s.get(m.Outbox, oid)
            if row is None:
                return
            row.attempts += 1
            row.last_error, row.lease_until = error[:4000], None
            if permanent or row.attempts >= self.cfg.max_attempts:
                row.state = "dead"
                if row.article_id:
                    s.execute(update(m.Article).where(m.Article.id == row.article_id)
                              .values(delivery_state="failed"))
                s.add(m.Event(type="delivery_failed", ticket_id=row.ticket_id,
                              article_id=row.article_id, created_at=now(),
                              data={"error": error[:1000], "attempts": row.attempts}))
                log.error("outbox %s dead after %d attempt(s): %s", oid, row.attempts, error)
            else:
                delay = min(self.cfg.backoff_initial * 2 ** (row.attempts - 1),
                            self.cfg.backoff_max)
                row.next_attempt_at = now() + timedelta(seconds=delay)
                log.warning("outbox %s attempt %d failed, retry in %.0fs: %s", oid,
                            row.attempts, delay, error)

    def run(self, stop: threading.Event, wake: threading.Event) -> None:
        while not stop.is_set():
            wake.clear()
            try:
                n = self.run_once()
            except Exception:
                log.exception("sender pass failed")
                n = 0
            if n == 0:
                wake.wait(self.cfg.poll_interval)
