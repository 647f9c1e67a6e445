"""Message-IDs from strangers, made fit for an indexed column.

RFC 5322 caps a line at 998 characters; RFC 6532 allows UTF-8 in an id. The columns that
hold ids (``inbound.message_id``, ``articles.message_id``) are indexed, and PostgreSQL's
B-tree refuses an entry of more than ~2,700 bytes: an id of 998 CJK characters (~3,000
bytes) made the insert fail, so the intake answered 451 to that message for ever (review
of issue 8 session 6). The limit is therefore in UTF-8 bytes. Lean on purpose:
``mailgw deliver`` imports it.
"""

from __future__ import annotations

ID_BYTES = 998

__all__ = ["ID_BYTES", "clip_id", "id_fits"]


def id_fits(mid: str) -> bool:
    """No NUL (PostgreSQL text refuses it) and at most ``ID_BYTES`` bytes in UTF-8."""
    if "\x00" in mid or len(mid) > ID_BYTES:
        return False
    return mid.isascii() or len(mid.encode("utf-8", "surrogatepass")) <= ID_BYTES


def clip_id(mid: str | None) -> str | None:
    """The id without NULs, cut to ``ID_BYTES`` bytes at a character boundary; None for
    nothing left."""
    if not mid:
        return None
    mid = mid.replace("\x00", "")
    if not id_fits(mid):
        mid = mid.encode("utf-8", "surrogatepass")[:ID_BYTES].decode("utf-8", "ignore")
    return mid or None
