"""Signed reply addresses: how mailgw knows that a mail comes from an agent.

A notification to an agent carries two addresses of the ticket's queue with a token in
the ``+detail``: ``support+t.TOKEN@example.com`` for the answer to the customer
(correspond) and ``support+c.TOKEN@example.com`` for an internal note (comment). The
token names the key, the agent, the ticket and the day it was issued, and carries an HMAC
over them and the kind (``t``/``c``); only the holder of the key can make one, and a
token is worth nothing for another ticket, another agent or after ``max_age_days``.

The token is base32 without padding, lower case: mail systems lowercase local parts, and
a local part must stay within 64 characters (RFC 5321 4.5.3.1.1). So the agent's name is
not in the token, only 4 bytes of its hash (the HMAC covers the whole name), and the
ticket id is a varint. A typical token is 36 characters.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, date, datetime

from mailgw.settings import Agent, AgentMailKey, Queue, Settings, per_settings

__all__ = ["KINDS", "Token", "TokenError", "find_token_address", "make_address", "make_token",
           "verify_token"]

KINDS = ("t", "c")  # t: reply to the customer (correspond); c: internal note (comment)
_MAC_BYTES = 10  # 80 bits
_EPOCH = date(2020, 1, 1)


class TokenError(Exception):
    """A reply address that must not be trusted; the message says why, for the agent."""


@dataclass(frozen=True)
class Token:
    kind: str  # "t" or "c"
    agent: Agent
    ticket_id: int
    key_id: str
    issued: date


def _b32encode(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _b32decode(text: str) -> bytes:
    text = text.upper()
    return base64.b32decode(text + "=" * (-len(text) % 8))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise TokenError("the reply address is damaged (it is not one of ours)")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _agent_hash(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()[:4]


def _mac(key: AgentMailKey, kind: str, agent: str, ticket_id: int, day: int) -> bytes:
    message = f"mailgw-agent-mail:v1:{kind}:{key.id}:{agent}:{ticket_id}:{day}".encode()
    return hmac.new(key.secret.encode(), message, hashlib.sha256).digest()[:_MAC_BYTES]


def _today(at: datetime | None) -> int:
    return ((at or datetime.now(UTC)).astimezone(UTC).date() - _EPOCH).days


def make_token(settings: Settings, kind: str, agent: Agent, ticket_id: int,
               at: datetime | None = None) -> str:
    """The token for ``agent`` on ticket ``ticket_id``, signed with the first key."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    key = settings.agent_mail.keys[0]
    day = _today(at)
    kid = key.id.encode()
    payload = (bytes([len(kid)]) + kid + _agent_hash(agent.name) + day.to_bytes(2, "big")
               + _varint(ticket_id))
    return _b32encode(payload + _mac(key, kind, agent.name, ticket_id, day))


def make_address(settings: Settings, queue: Queue, kind: str, agent: Agent, ticket_id: int,
                 at: datetime | None = None) -> str:
    """``<queue local>+<kind>.<token>@<queue domain>`` for the queue's sending address."""
    local, _, domain = queue.from_address.rpartition("@")
    local = local.split("+", 1)[0]
    return f"{local}+{kind}.{make_token(settings, kind, agent, ticket_id, at)}@{domain}"


def verify_token(settings: Settings, kind: str, token: str,
                 at: datetime | None = None) -> Token:
    """The agent and ticket a token names; raises TokenError saying why it is not valid.

    Checks, in order: it decodes, its key is still configured, the HMAC matches an agent
    that is still configured (a tampered token and a removed agent look the same), and it
    is not older than ``max_age_days`` (nor from the future). Whether the agent still has
    the ticket's queue is for the caller, who has the ticket.
    """
    try:
        data = _b32decode(token.strip())
    except (binascii.Error, ValueError):
        raise TokenError("the reply address is damaged (it is not one of ours)") from None
    if len(data) < 1 + 4 + 2 + 1 + _MAC_BYTES or data[0] == 0 or data[0] > 8:
        raise TokenError("the reply address is damaged (it is not one of ours)")
    end = 1 + data[0]
    kid = data[1:end].decode("ascii", "replace")
    agent_hash, day = data[end:end + 4], int.from_bytes(data[end + 4:end + 6], "big")
    ticket_id, pos = _read_varint(data, end + 6)
    mac = data[pos:]
    if len(mac) != _MAC_BYTES:
        raise TokenError("the reply address is damaged (it is not one of ours)")
    key = next((k for k in settings.agent_mail.keys if k.id == kid), None)
    if key is None:
        raise TokenError(f"the reply address was signed with key {kid!r}, which is no longer "
                         "configured (rotated out); reply to a newer notification")
    agent = next((a for a in _agents_by_hash(settings).get(agent_hash, ())
                  if hmac.compare_digest(mac, _mac(key, kind, a.name, ticket_id, day))), None)
    if agent is None:
        raise TokenError("the reply address does not verify: it was altered, or its agent is "
                         "no longer configured")
    age = _today(at) - day
    if age > settings.agent_mail.max_age_days:
        raise TokenError(f"the reply address expired: issued {age} days ago, valid for "
                         f"{settings.agent_mail.max_age_days}; reply to a newer notification")
    if age < -1:
        raise TokenError("the reply address is dated in the future")
    issued = date.fromordinal(_EPOCH.toordinal() + day)
    return Token(kind=kind, agent=agent, ticket_id=ticket_id, key_id=kid, issued=issued)


@per_settings
def _agents_by_hash(settings: Settings) -> dict[bytes, list[Agent]]:
    out: dict[bytes, list[Agent]] = {}
    for a in settings.agents:
        out.setdefault(_agent_hash(a.name), []).append(a)
    return out


@per_settings
def _queue_bases(settings: Settings) -> dict[str, Queue]:
    """Every address a queue serves or sends from, without ``+detail``: where tokens live."""
    out: dict[str, Queue] = {}
    for q in settings.queues:
        for address in (*q.addresses, q.from_address.lower()):
            local, _, domain = address.rpartition("@")
            out.setdefault(f"{local.split('+', 1)[0]}@{domain}", q)
    return out


def find_token_address(settings: Settings, addresses: list[str] | tuple[str, ...]
                       ) -> tuple[str, str, Queue] | None:
    """The first ``local+t.TOKEN@domain`` / ``+c.`` address of one of our queues among
    ``addresses``: (kind, token, queue). Cheap for ordinary mail: a substring test first."""
    for address in addresses:
        if "+t." not in address and "+c." not in address and "+T." not in address \
                and "+C." not in address:
            continue
        address = address.strip().strip("<>").lower()
        local, _, domain = address.rpartition("@")
        base, _, detail = local.partition("+")
        kind, dot, token = detail.partition(".")
        if kind not in KINDS or not dot or not token:
            continue
        queue = _queue_bases(settings).get(f"{base}@{domain}")
        if queue is not None:
            return kind, token, queue
    return None
