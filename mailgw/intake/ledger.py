"""The IMAP ledger, mailbox leases and mailbox status, all in the database.

One transaction per fetched batch holds the inbound rows, their ledger rows and the events,
and first re-checks that this poller still holds the mailbox lease (a fence): a message is in
the ledger exactly when it is durable in the inbound queue. The ledger's unique key
(mailbox, folder, UIDVALIDITY, UID) makes a second copy of a UID fail its whole transaction,
whatever the leases did, so no message is queued twice even by two pollers.

Identity of a message, in order:
1. the same (mailbox, folder, UIDVALIDITY, UID): already taken in, nothing to do;
2. the same SHA-256 of the raw bytes as an earlier message of the mailbox: a copy (appended
   twice, or seen again under a new UIDVALIDITY): recorded as ``duplicate``, not queued;
3. after a UIDVALIDITY change, the same Message-ID + Date + From as a message taken in under
   an older UIDVALIDITY of the same folder (servers may rewrite headers when they rebuild a
   mailbox): recorded as ``known``, not queued;
4. otherwise a new message, queued. If its Message-ID was seen before with other bytes, it is
   still queued (a Message-ID is not proof of sameness) and the event log says so.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.parser import BytesHeaderParser
from email.policy import compat32

from sqlalchemy import Engine, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from mailgw.queue import put_in
from mailgw.store import models as m
from mailgw.types import Envelope


def now() -> datetime:
    return datetime.now(UTC)


class LeaseLost(Exception):
    """Another poller holds this mailbox now; the batch was not committed."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """One message as fetched from a folder."""

    uid: int
    raw: bytes
    sha256: str
    message_id: str | None
    identity: str | None  # "date|from", lower-cased and whitespace-normalised
    return_path: str | None  # envelope sender from Return-Path ("" for <>), None if absent

    @classmethod
    def of(cls, uid: int, raw: bytes) -> Fetched:
        # Only the header is parsed, with the lenient compat32 policy: never raises.
        h = BytesHeaderParser(policy=compat32).parsebytes(raw)

        def one(name: str) -> str | None:
            v = h.get(name)
            return " ".join(str(v).split()) if v is not None else None

        mid = one("Message-ID")
        mid = mid.strip().strip("<>").strip()[:998] if mid else None
        date, sender = one("Date"), one("From")
        identity = f"{date or ''}|{sender or ''}".lower()[:1000] if (date or sender) else None
        rp = one("Return-Path")
        if rp is not None:
            rp = rp.strip().strip("<>").strip()[:998]
        return cls(uid, raw, hashlib.sha256(raw).hexdigest(), mid or None, identity, rp)


@dataclass(frozen=True, slots=True)
class Outcome:
    uid: int
    status: str  # queued | duplicate | known
    inbound_id: int | None


def holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"[:200]


def _dead_local(holder: str | None) -> bool:
    """True if the holder is a process on this host that no longer exists."""
    if not holder:
        return False
    parts = holder.split(":")
    if len(parts) < 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _ensure_status(engine: Engine, mailbox: str) -> None:
    with engine.connect() as c:
        if c.execute(select(m.MailboxStatus.mailbox)
                     .where(m.MailboxStatus.mailbox == mailbox)).first():
            return
    try:
        with engine.begin() as c:
            c.execute(insert(m.MailboxStatus).values(mailbox=mailbox, ingested=0))
    except IntegrityError:
        pass  # another process created it first


def acquire_lease(engine: Engine, mailbox: str, me: str, seconds: float) -> str | None:
    """Take or renew the mailbox lease. Returns None when held by us now, else the holder."""
    _ensure_status(engine, mailbox)
    stamp = now()
    with engine.begin() as c:
        row = c.execute(select(m.MailboxStatus.lease_holder, m.MailboxStatus.lease_until)
                        .where(m.MailboxStatus.mailbox == mailbox)).one()
        free = or_(m.MailboxStatus.lease_holder.is_(None),
                   m.MailboxStatus.lease_holder == me,
                   m.MailboxStatus.lease_until.is_(None),
                   m.MailboxStatus.lease_until < stamp)
        if row.lease_holder and row.lease_holder != me and _dead_local(row.lease_holder):
            # A crashed gateway on this host: its lease need not run out.
            free = or_(free, m.MailboxStatus.lease_holder == row.lease_holder)
        res = c.execute(update(m.MailboxStatus).where(m.MailboxStatus.mailbox == mailbox, free)
                        .values(lease_holder=me, lease_until=stamp + timedelta(seconds=seconds)))
        return None if res.rowcount == 1 else row.lease_holder


def release_lease(engine: Engine, mailbox: str, me: str) -> None:
    with engine.begin() as c:
        c.execute(update(m.MailboxStatus)
                  .where(m.MailboxStatus.mailbox == mailbox, m.MailboxStatus.lease_holder == me)
                  .values(lease_holder=None, lease_until=None))


def record_status(engine: Engine, mailbox: str, *, error: str | None) -> None:
    """A poll finished (error None) or failed (the error, as the operator should read it)."""
    _ensure_status(engine, mailbox)
    stamp = now()
    values: dict = {"last_poll_at": stamp}
    if error is None:
        values.update(last_ok_at=stamp, last_error=None, last_error_at=None)
    else:
        values.update(last_error=error[:4000], last_error_at=stamp)
    with engine.begin() as c:
        c.execute(update(m.MailboxStatus).where(m.MailboxStatus.mailbox == mailbox)
                  .values(**values))


def folder_state(engine: Engine, mailbox: str, folder: str) -> tuple[int, int] | None:
    """(UIDVALIDITY, highest UID taken in) of a folder, or None before its first read."""
    with engine.connect() as c:
        row = c.execute(select(m.ImapFolder.uidvalidity, m.ImapFolder.last_uid).where(
            m.ImapFolder.mailbox == mailbox, m.ImapFolder.folder == folder)).first()
    return (row.uidvalidity, row.last_uid) if row else None


def start_folder(engine: Engine, mailbox: str, folder: str, uidvalidity: int,
                 old: tuple[int, int] | None) -> None:
    """Record the folder's UIDVALIDITY (first read, or a change: UIDs start over)."""
    with engine.begin() as c:
        if old is None:
            try:
                with c.begin_nested():
                    c.execute(insert(m.ImapFolder).values(
                        mailbox=mailbox, folder=folder, uidvalidity=uidvalidity, last_uid=0))
            except IntegrityError:
                pass
            return
        c.execute(update(m.ImapFolder).where(
            m.ImapFolder.mailbox == mailbox, m.ImapFolder.folder == folder,
            m.ImapFolder.uidvalidity == old[0]).values(uidvalidity=uidvalidity, last_uid=0))
        c.execute(insert(m.Event).values(
            type="imap_uidvalidity_changed", created_at=now(),
            data={"mailbox": mailbox, "folder": folder, "old": old[0], "new": uidvalidity,
                  "note": "messages are matched by hash, then Message-ID + Date + From; "
                          "none is queued again"}))


def pending_actions(engine: Engine, mailbox: str, folder: str, uidvalidity: int) -> list[int]:
    """UIDs committed but whose after-action (move/flag/delete) is not known to be done."""
    with engine.connect() as c:
        return list(c.execute(select(m.ImapMessage.uid).where(
            m.ImapMessage.mailbox == mailbox, m.ImapMessage.folder == folder,
            m.ImapMessage.uidvalidity == uidvalidity, ~m.ImapMessage.action_done)
            .order_by(m.ImapMessage.uid)).scalars())


def mark_action_done(engine: Engine, mailbox: str, folder: str, uidvalidity: int,
                     uids: list[int]) -> None:
    with engine.begin() as c:
        for i in range(0, len(uids), 500):
            c.execute(update(m.ImapMessage).where(
                m.ImapMessage.mailbox == mailbox, m.ImapMessage.folder == folder,
                m.ImapMessage.uidvalidity == uidvalidity,
                m.ImapMessage.uid.in_(uids[i:i + 500])).values(action_done=True))


def commit_batch(engine: Engine, *, mailbox: str, folder: str, uidvalidity: int, queue: str,
                 me: str, lease_seconds: float, batch: list[Fetched],
                 upto: int | None = None) -> list[Outcome]:
    """Queue the new messages of a batch and record every message in the ledger, in one
    transaction that first re-checks our lease. The folder's last UID moves up to ``upto``
    (default: the batch's highest UID; lower when a UID below it was not fetched, so it is
    looked for again). Raises LeaseLost (nothing committed) if another poller took the
    mailbox, IntegrityError if a UID was committed concurrently."""
    stamp = now()
    with engine.begin() as c:
        fence = c.execute(update(m.MailboxStatus).where(
            m.MailboxStatus.mailbox == mailbox, m.MailboxStatus.lease_holder == me).values(
            lease_until=stamp + timedelta(seconds=lease_seconds)))
        if fence.rowcount != 1:
            raise LeaseLost(mailbox)
        uids = [f.uid for f in batch]
        have = set(c.execute(select(m.ImapMessage.uid).where(
            m.ImapMessage.mailbox == mailbox, m.ImapMessage.folder == folder,
            m.ImapMessage.uidvalidity == uidvalidity, m.ImapMessage.uid.in_(uids))).scalars())
        todo = [f for f in batch if f.uid not in have]
        hashes = sorted({f.sha256 for f in todo})
        by_hash: dict[str, int | None] = {}
        if hashes:
            for sha, iid in c.execute(select(m.ImapMessage.sha256, m.ImapMessage.inbound_id)
                                      .where(m.ImapMessage.mailbox == mailbox,
                                             m.ImapMessage.sha256.in_(hashes))
                                      .order_by(m.ImapMessage.id)):
                by_hash.setdefault(sha, iid)
        mids = sorted({f.message_id for f in todo if f.message_id})
        earlier: dict[str, list[tuple]] = {}
        if mids:
            for row in c.execute(select(
                    m.ImapMessage.message_id, m.ImapMessage.identity, m.ImapMessage.sha256,
                    m.ImapMessage.inbound_id, m.ImapMessage.folder, m.ImapMessage.uidvalidity)
                    .where(m.ImapMessage.mailbox == mailbox, m.ImapMessage.message_id.in_(mids))
                    .order_by(m.ImapMessage.id)):
                earlier.setdefault(row.message_id, []).append(tuple(row))

        new: list[Fetched] = []
        ledger: list[dict] = []
        events: list[dict] = []
        outcomes: dict[int, Outcome] = {}
        pending_hash: dict[str, Fetched] = {}
        base = {"mailbox": mailbox, "folder": folder, "uidvalidity": uidvalidity}
        for f in todo:
            where = {**base, "uid": f.uid}
            row = {**where, "sha256": f.sha256, "message_id": f.message_id,
                   "identity": f.identity, "action_done": False, "created_at": stamp}
            if f.sha256 in by_hash or f.sha256 in pending_hash:
                iid = by_hash.get(f.sha256)
                ledger.append({**row, "status": "duplicate", "inbound_id": iid,
                               "_same": f.sha256})
                events.append({"type": "imap_duplicate", "inbound_id": iid,
                               "data": {**where, "sha256": f.sha256,
                                        "reason": "the same bytes were taken in before"}})
                outcomes[f.uid] = Outcome(f.uid, "duplicate", iid)
                continue
            prior = earlier.get(f.message_id or "", [])
            match = next((p for p in prior if p[4] == folder and p[5] != uidvalidity
                          and p[1] == f.identity and f.identity), None)
            if match is not None:
                ledger.append({**row, "status": "known", "inbound_id": match[3]})
                events.append({"type": "imap_known_after_uidvalidity_change",
                               "inbound_id": match[3],
                               "data": {**where, "message_id": f.message_id,
                                        "reason": "same Message-ID, Date and From as a message "
                                                  "taken in under UIDVALIDITY "
                                                  f"{match[5]}"}})
                outcomes[f.uid] = Outcome(f.uid, "known", match[3])
                continue
            pending_hash[f.sha256] = f
            new.append(f)

        ids = put_in(c, [Envelope(
            raw=f.raw, mail_from=f.return_path, rcpt_tos=(), source="imap",
            received_at=stamp, source_ref=f"{mailbox}/{folder}/{uidvalidity}/{f.uid}"[:500],
            queue=queue) for f in new])
        new_ids = {f.sha256: iid for f, iid in zip(new, ids, strict=True)}
        for f, iid in zip(new, ids, strict=True):
            ledger.append({**base, "uid": f.uid, "sha256": f.sha256, "message_id": f.message_id,
                           "identity": f.identity, "action_done": False, "created_at": stamp,
                           "status": "queued", "inbound_id": iid})
            outcomes[f.uid] = Outcome(f.uid, "queued", iid)
            reused = [p for p in earlier.get(f.message_id or "", []) if p[2] != f.sha256]
            if reused:
                events.append({"type": "imap_message_id_reused", "inbound_id": iid,
                               "data": {"mailbox": mailbox, "folder": folder, "uid": f.uid,
                                        "message_id": f.message_id, "sha256": f.sha256,
                                        "earlier_inbound_id": reused[0][3],
                                        "earlier_sha256": reused[0][2],
                                        "reason": "a different message with a Message-ID seen "
                                                  "before: kept as a message of its own"}})
        for row in ledger:
            same = row.pop("_same", None)
            if same is not None and row["inbound_id"] is None:
                # A copy of a message queued in this very batch.
                row["inbound_id"] = new_ids.get(same)
                outcomes[row["uid"]] = Outcome(row["uid"], "duplicate", row["inbound_id"])
        for e in events:
            if e["type"] == "imap_duplicate" and e["inbound_id"] is None:
                e["inbound_id"] = new_ids.get(e["data"]["sha256"])
        if ledger:
            c.execute(insert(m.ImapMessage), sorted(ledger, key=lambda r: r["uid"]))
        if events:
            c.execute(insert(m.Event), [{**e, "created_at": stamp} for e in events])
        last = upto if upto is not None else max(uids, default=0)
        if last:
            c.execute(update(m.ImapFolder).where(
                m.ImapFolder.mailbox == mailbox, m.ImapFolder.folder == folder,
                m.ImapFolder.uidvalidity == uidvalidity,
                m.ImapFolder.last_uid < last).values(last_uid=last))
        if new:
            c.execute(update(m.MailboxStatus).where(m.MailboxStatus.mailbox == mailbox)
                      .values(ingested=m.MailboxStatus.ingested + len(new)))
    return [outcomes[f.uid] for f in batch if f.uid in outcomes]


def mailbox_statuses(engine: Engine) -> list[dict]:
    """Every mailbox's status row plus its ledger count, for ``mailgw status``."""
    with engine.connect() as c:
        counts = dict(c.execute(select(m.ImapMessage.mailbox, func.count())
                                .group_by(m.ImapMessage.mailbox)).all())
        rows = c.execute(select(m.MailboxStatus).order_by(m.MailboxStatus.mailbox)).all()
    stamp = now()
    out = []
    for r in rows:
        until = r.lease_until
        if until is not None and until.tzinfo is None:
            until = until.replace(tzinfo=UTC)
        out.append({
            "mailbox": r.mailbox, "last_poll_at": r.last_poll_at, "last_ok_at": r.last_ok_at,
            "last_error": r.last_error, "last_error_at": r.last_error_at,
            "ingested": r.ingested, "ledger": counts.get(r.mailbox, 0),
            "poller": r.lease_holder if until is not None and until > stamp else None,
        })
    return out

