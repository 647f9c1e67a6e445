"""Our signed identifiers: VERP return paths and Message-IDs that only we can make.

Every outgoing mail is sent with the envelope sender ``bounces+TOKEN@<queue domain>``
(VERP). TOKEN is the outgoing article's id and an HMAC of it, so a bounce delivered to that
address names exactly the mail that failed, and a bounce to a made-up token is refused at
RCPT or, if it got in another way, not trusted. Our Message-IDs carry an HMAC too, so our
own mail coming back is recognised (``own_loop``) without a database look-up.

The key is ``machine_mail.secret`` (``mailgw init`` writes a random one). Without it, the
key is derived from the hostname and the queue addresses: stable across restarts and nodes
with the same config, but anyone who knows the config can forge tokens, so set a secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

from mailgw.settings import Settings, per_settings

__all__ = ["Signer", "signer_for"]

_TAG = 10  # characters of base32 HMAC: 50 bits


def _b32(digest: bytes) -> str:
    """The tag: the first ``_TAG`` characters of the digest's lowercase base32. Base32 codes
    each 5-byte group into 8 characters on its own, so the first 10 bytes (two whole groups)
    give the first 16 characters of the whole digest's code: the same tag, with a third of
    the encoding (``b32encode`` is pure Python)."""
    return base64.b32encode(digest[:10]).decode("ascii").lower()[:_TAG]


class Signer:
    def __init__(self, key: bytes, hostname: str, verp_local: str = "bounces",
                 verp: bool = True):
        self._key = key
        self.hostname = hostname
        self.verp_local = verp_local.lower()
        self.verp = verp

    def _tag(self, kind: str, value: str) -> str:
        return _b32(hmac.new(self._key, f"{kind}:{value}".encode(), hashlib.sha256).digest())

    # --- Message-IDs ----------------------------------------------------------------------

    def message_id(self, ticket_id: int | None) -> str:
        """A new bare Message-ID of ours, with an HMAC: mailgw.T.TIME.RAND.TAG@host."""
        left = f"mailgw.{ticket_id or 0}.{int(time.time())}.{secrets.token_hex(6)}"
        return f"{left}.{self._tag('mid', left)}@{self.hostname}"

    def is_our_message_id(self, message_id: str) -> bool:
        left = message_id.strip().strip("<>").rpartition("@")[0]
        body, _, tag = left.rpartition(".")
        return (body.startswith("mailgw.") and len(tag) == _TAG
                and hmac.compare_digest(tag, self._tag("mid", body)))

    # --- VERP -----------------------------------------------------------------------------

    def verp_address(self, article_id: int, from_address: str) -> str:
        """The envelope sender for the outgoing article: bounces+ID-TAG@<its domain>."""
        domain = from_address.rpartition("@")[2]
        token = f"{article_id:x}-{self._tag('verp', str(article_id))}"
        return f"{self.verp_local}+{token}@{domain}"

    def verp_article(self, address: str) -> int | None:
        """The article id a VERP address of ours names, or None (not ours, or forged)."""
        local = address.strip().strip("<>").rpartition("@")[0].lower()
        prefix = f"{self.verp_local}+"
        if not local.startswith(prefix):
            return None
        ident, _, tag = local[len(prefix):].partition("-")
        try:
            article_id = int(ident, 16)
        except ValueError:
            return None
        if hmac.compare_digest(tag, self._tag("verp", str(article_id))):
            return article_id
        return None


def _key(settings: Settings) -> bytes:
    if settings.machine_mail.secret:
        return settings.machine_mail.secret.encode()
    seed = "|".join([settings.hostname, *sorted(a for q in settings.queues for a in q.addresses)])
    return hashlib.sha256(f"mailgw-derived-key:{seed}".encode()).digest()


@per_settings
def signer_for(settings: Settings) -> Signer:
    """The signer for these settings, made once per settings object."""
    mm = settings.machine_mail
    return Signer(_key(settings), settings.hostname, mm.verp_local, mm.verp)
