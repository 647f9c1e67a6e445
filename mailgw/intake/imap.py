"""IMAP intake: one poller per configured mailbox reads its folders into the inbound queue.

Per folder and batch: fetch with ``BODY.PEEK[]`` (reading changes nothing on the server),
commit the inbound rows and their ledger rows in one transaction (``mailgw/intake/ledger.py``),
and only then apply the after-action (move to ``Processed``, flag ``\\Seen`` or delete). A
crash before the commit leaves the messages untouched on the server and out of the ledger: the
next run reads them again. A crash after it leaves them in the ledger with the action not done:
the next run does the action and queues nothing.

Between polls the poller waits in IMAP IDLE when the server offers it (new mail is read within
a second or two), else sleeps ``poll_interval``. Network errors reconnect with exponential
backoff; authentication failures are logged as errors and stored for ``mailgw status`` on every
attempt. A lease in ``mailbox_status`` keeps one poller per mailbox across processes and nodes.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from mailgw.intake import imap_tls, ledger
from mailgw.intake.imap_auth import AuthError, Credentials, _answer
from mailgw.settings import Mailbox

log = logging.getLogger(__name__)

BACKOFF_INITIAL, BACKOFF_MAX = 1.0, 300.0
MAX_BATCH_BYTES = 32 * 1024 * 1024  # bounded memory: at most this much mail fetched at once
IDLE_MAX = 25 * 60.0  # seconds in one IDLE command at most
PROGRESS_AT = 200  # a folder with more new messages than this logs its progress per batch


def _failpoint(name: str) -> None:
    """Crash hard at a named point when MAILGW_IMAP_FAILPOINT says so (crash tests only)."""
    if os.environ.get("MAILGW_IMAP_FAILPOINT") == name:
        log.warning("failpoint %s: killing this process", name)
        os.kill(os.getpid(), signal.SIGKILL)


def lease_seconds(mailbox: Mailbox) -> float:
    return max(30.0, 3 * mailbox.poll_interval)


def connect(mailbox: Mailbox, creds: Credentials):  # type: ignore[no-untyped-def]
    """A logged-in IMAPClient. Raises AuthError on a refused login (TLSError, one, on a TLS
    failure: certificate not trusted, no STARTTLS), OSError/IMAP errors else."""
    from imapclient import IMAPClient

    # TLS (imaps/starttls) verifies the certificate and host name: mailgw/intake/imap_tls.py.
    context = imap_tls.context(mailbox, creds.base) if mailbox.tls != "plain" else None
    try:
        client = IMAPClient(mailbox.host, port=mailbox.real_port, ssl=mailbox.tls == "imaps",
                            ssl_context=context if mailbox.tls == "imaps" else None,
                            timeout=mailbox.timeout)
    except ssl.SSLCertVerificationError as exc:
        raise imap_tls.verify_failed(mailbox, creds.base, exc) from None
    try:
        if mailbox.tls == "starttls":
            imap_tls.starttls(client, mailbox, creds.base, context)  # type: ignore[arg-type]
        creds.login(client)
    except BaseException:
        try:
            client.shutdown()
        except Exception:  # noqa: BLE001 - already failing
            pass
        raise
    return client


@dataclass
class FolderReport:
    folder: str
    messages: int | None
    error: str | None = None


def check(mailbox: Mailbox, base: Path) -> tuple[list[str], list[FolderReport]]:
    """Log in and look at every folder (read-only); for ``mailgw mailboxes check``.
    Returns the capabilities and one report per folder; raises AuthError/OSError/IMAP errors."""
    client = connect(mailbox, Credentials(mailbox, base))
    try:
        caps = sorted(c.decode() if isinstance(c, bytes) else str(c)
                      for c in client.capabilities())
        reports = []
        for folder in mailbox.folders:
            try:
                info = client.select_folder(folder, readonly=True)
                reports.append(FolderReport(folder, int(info.get(b"EXISTS", 0))))
            except Exception as exc:  # noqa: BLE001 - reported per folder
                reports.append(FolderReport(folder, None, _answer(exc)))
        return caps, reports
    finally:
        try:
            client.logout()
        except Exception:  # noqa: BLE001
            pass


class Poller:
    """Reads one mailbox until ``stop`` is set. ``run`` never raises."""

    def __init__(self, engine: Engine, mailbox: Mailbox, base: Path, stop: threading.Event,
                 on_commit: Callable[[], None] | None = None):
        self.engine = engine
        self.mb = mailbox
        self.creds = Credentials(mailbox, base)
        self.stop = stop
        self.on_commit = on_commit
        self.me = ledger.holder_id()
        self.lease = lease_seconds(mailbox)
        self._created: set[str] = set()
        self._logged_in = False
        self.folder_errors: list[str] = []

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        backoff = BACKOFF_INITIAL
        holder_logged = None
        while not self.stop.is_set():
            try:
                holder = ledger.acquire_lease(self.engine, self.mb.name, self.me, self.lease)
            except Exception as exc:  # noqa: BLE001 - the database may be down for a while
                log.error("mailbox %s: cannot take the poller lease: %s", self.mb.name, exc)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            if holder is not None:
                if holder != holder_logged:
                    log.info("mailbox %s is read by %s; standing by", self.mb.name, holder)
                    holder_logged = holder
                self.stop.wait(min(self.lease / 3, self.mb.poll_interval))
                continue
            holder_logged = None
            self._logged_in = False
            try:
                self._session()
                # Stopped, or a fresh login for a token about to expire (not in a tight loop
                # when tokens are shorter-lived than the refresh window).
                backoff = BACKOFF_INITIAL
                self.stop.wait(min(self.mb.poll_interval, 5.0))
                continue
            except AuthError as exc:
                self._failed(str(exc))
                # Not a network hiccup: retry slowly, but keep saying so.
                backoff = max(backoff, 60.0)
            except ledger.LeaseLost:
                log.warning("mailbox %s: lease lost to another poller; standing by", self.mb.name)
                backoff = BACKOFF_INITIAL
            except Exception as exc:  # noqa: BLE001 - network, server or database trouble
                self._failed(f"mailbox {self.mb.name}: {type(exc).__name__}: {_answer(exc)}")
                if self._logged_in:
                    backoff = BACKOFF_INITIAL  # it worked until now: retry soon
            if self.stop.wait(backoff):
                break
            backoff = min(backoff * 2, BACKOFF_MAX)
        try:
            ledger.release_lease(self.engine, self.mb.name, self.me)
        except Exception:  # noqa: BLE001 - it expires anyway
            pass

    def _failed(self, message: str) -> None:
        log.error("%s", message)
        try:
            ledger.record_status(self.engine, self.mb.name, error=message)
        except Exception:  # noqa: BLE001 - the log line above is the fallback
            log.exception("mailbox %s: cannot record the error", self.mb.name)

    def _session(self) -> None:
        """One connection: poll, wait (IDLE or sleep), poll again, until stop, error or the
        OAuth2 token needs renewing."""
        client = connect(self.mb, self.creds)
        self._logged_in = True
        log.info("mailbox %s: logged in to %s:%d as %s (%s)", self.mb.name, self.mb.host,
                 self.mb.real_port, self.mb.username, self.creds.method)
        try:
            idle = self.mb.idle and client.has_capability("IDLE")
            while not self.stop.is_set():
                self.poll_once(client)
                ledger.record_status(self.engine, self.mb.name,
                                     error="; ".join(self.folder_errors) or None)
                if self.creds.needs_relogin():
                    log.info("mailbox %s: OAuth2 token about to expire; logging in again",
                             self.mb.name)
                    return
                if idle:
                    self._idle(client)
                else:
                    self.stop.wait(self.mb.poll_interval)
                if self.stop.is_set():
                    return
                if ledger.acquire_lease(self.engine, self.mb.name, self.me, self.lease):
                    raise ledger.LeaseLost(self.mb.name)
        finally:
            try:
                client.logout()
            except Exception:  # noqa: BLE001
                pass

    def _idle(self, client) -> None:  # type: ignore[no-untyped-def]
        """Wait in IDLE on the first folder until it reports news, poll_interval passes (the
        other folders and the lease need a look too) or we are stopped."""
        client.select_folder(self.mb.folders[0])
        client.idle()
        try:
            # RFC 2177: re-issue IDLE well within the servers' 30-minute inactivity timeout.
            deadline = time.monotonic() + min(self.mb.poll_interval, IDLE_MAX)
            while not self.stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                responses = client.idle_check(timeout=min(1.0, left))
                if any(len(r) > 1 and r[1] in (b"EXISTS", b"RECENT") for r in responses):
                    break
        finally:
            client.idle_done()

    # -- one pass over the folders ----------------------------------------------------------

    def poll_once(self, client) -> int:  # type: ignore[no-untyped-def]
        """Read every folder once; returns how many messages were queued. A folder the server
        refuses (deleted, no rights) is reported in ``folder_errors`` and does not keep the
        other folders from being read; a broken connection raises."""
        from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

        queued = 0
        self.folder_errors.clear()
        for folder in self.mb.folders:
            try:
                queued += self._folder(client, folder)
            except IMAPClientAbortError:
                raise
            except IMAPClientError as exc:
                msg = f"mailbox {self.mb.name} folder {folder}: {_answer(exc)}"
                log.error("%s", msg)
                self.folder_errors.append(msg)
        return queued

    def _folder(self, client, folder: str) -> int:  # type: ignore[no-untyped-def]
        info = client.select_folder(folder)
        uidvalidity = int(info[b"UIDVALIDITY"])
        state = ledger.folder_state(self.engine, self.mb.name, folder)
        if state is None or state[0] != uidvalidity:
            if state is not None:
                log.warning("mailbox %s folder %s: UIDVALIDITY changed from %d to %d; matching "
                            "messages by hash and Message-ID, none is queued twice",
                            self.mb.name, folder, state[0], uidvalidity)
            ledger.start_folder(self.engine, self.mb.name, folder, uidvalidity, state)
            last = 0
        else:
            last = state[1]
        # Messages committed earlier whose after-action did not happen (a crash, a dropped
        # connection): do it now.
        leftover = ledger.pending_actions(self.engine, self.mb.name, folder, uidvalidity)
        if leftover:
            self._after(client, folder, uidvalidity, leftover)
        uids = sorted(u for u in client.search(["UID", f"{last + 1}:*"]) if u > last)
        if not uids:
            return 0
        total, done, queued = len(uids), 0, 0
        if total > PROGRESS_AT:
            log.info("mailbox %s folder %s: %d messages to read", self.mb.name, folder, total)
        missing: list[int] = []  # UIDs searched but not fetched (expunged meanwhile?)
        for chunk in self._chunks(client, uids, missing):
            if self.stop.is_set():
                break  # shutting down: the rest is read at the next start
            batch = self._fetch(client, chunk)
            got = {f.uid for f in batch}
            lost = [u for u in chunk if u not in got]
            if lost:
                # The last UID must not pass a message we did not get: the next poll looks
                # for it again (an expunged one is simply not found any more).
                log.warning("mailbox %s folder %s: UIDs %s not returned by FETCH; looked for "
                            "again at the next poll", self.mb.name, folder, lost[:10])
                missing += lost
            upto = min(missing) - 1 if missing else max(chunk)
            _failpoint("after_fetch")
            try:
                outcomes = ledger.commit_batch(
                    self.engine, mailbox=self.mb.name, folder=folder, uidvalidity=uidvalidity,
                    queue=self.mb.queue, me=self.me, lease_seconds=self.lease, batch=batch,
                    upto=upto)
            except IntegrityError as exc:
                # Another poller committed one of these UIDs (its lease and ours overlapped):
                # nothing of ours was committed; stand down and let the lease decide.
                raise ledger.LeaseLost(self.mb.name) from exc
            _failpoint("after_commit")
            n = sum(1 for o in outcomes if o.status == "queued")
            queued += n
            if n and self.on_commit:
                self.on_commit()
            for o in outcomes:
                if o.status != "queued":
                    log.info("mailbox %s folder %s UID %d: %s of inbound %s, not queued again",
                             self.mb.name, folder, o.uid, o.status, o.inbound_id)
            self._after(client, folder, uidvalidity, [o.uid for o in outcomes])
            done += len(chunk)
            if total > PROGRESS_AT:
                log.info("mailbox %s folder %s: %d of %d messages read", self.mb.name, folder,
                         done, total)
        return queued

    def _chunks(self, client, uids: list[int], missing: list[int]):  # type: ignore[no-untyped-def]
        """Batches of at most batch_size messages and MAX_BATCH_BYTES (a bigger message
        goes alone), so memory stays bounded however large the mailbox. UIDs the server
        gives no size for are added to ``missing``."""
        for i in range(0, len(uids), self.mb.batch_size):
            part = uids[i:i + self.mb.batch_size]
            sizes = client.fetch(part, ["RFC822.SIZE"])
            chunk: list[int] = []
            size = 0
            for uid in part:
                if uid not in sizes:
                    missing.append(uid)  # expunged meanwhile, most likely
                    continue
                n = int(sizes[uid].get(b"RFC822.SIZE", 0))
                if chunk and size + n > MAX_BATCH_BYTES:
                    yield chunk
                    chunk, size = [], 0
                chunk.append(uid)
                size += n
            if chunk:
                yield chunk

    def _fetch(self, client, uids: list[int]) -> list[ledger.Fetched]:  # type: ignore[no-untyped-def]
        data = client.fetch(uids, ["BODY.PEEK[]"])
        out = []
        for uid in uids:
            item = data.get(uid)
            raw = item.get(b"BODY[]") if item else None
            if raw is None:
                continue  # expunged between SEARCH and FETCH
            out.append(ledger.Fetched.of(uid, bytes(raw)))
        return out

    def _after(self, client, folder: str, uidvalidity: int, uids: list[int]) -> None:  # type: ignore[no-untyped-def]
        """The after-action, only for messages already committed. Marked done afterwards; a
        crash in between repeats it, which is harmless (the UIDs are gone or flagged)."""
        if not uids:
            return
        mb = self.mb
        if mb.after == "move":
            if mb.move_to not in self._created and not client.folder_exists(mb.move_to):
                client.create_folder(mb.move_to)
                log.info("mailbox %s: created folder %s", mb.name, mb.move_to)
            self._created.add(mb.move_to)
            if client.has_capability("MOVE"):
                client.move(uids, mb.move_to)
            else:
                client.copy(uids, mb.move_to)
                self._expunge(client, uids)
        elif mb.after == "flag":
            from imapclient import SEEN

            client.add_flags(uids, [SEEN])
        else:
            self._expunge(client, uids)
        ledger.mark_action_done(self.engine, mb.name, folder, uidvalidity, uids)

    @staticmethod
    def _expunge(client, uids: list[int]) -> None:  # type: ignore[no-untyped-def]
        from imapclient import DELETED

        client.add_flags(uids, [DELETED])
        if client.has_capability("UIDPLUS"):
            client.uid_expunge(uids)
        else:
            client.expunge()


def start_pollers(engine: Engine, mailboxes: list[Mailbox], base: Path, stop: threading.Event,
                  on_commit: Callable[[], None] | None = None) -> list[threading.Thread]:
    """One thread per mailbox (the gateway's ``imap`` role)."""
    threads = []
    for mb in mailboxes:
        poller = Poller(engine, mb, base, stop, on_commit)
        t = threading.Thread(target=poller.run, name=f"imap-{mb.name}", daemon=True)
        t.start()
        threads.append(t)
    return threads


