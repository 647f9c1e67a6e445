"""outbound/verp.py's tag: the same as before it encoded only the digest's first 10 bytes,
so Message-IDs and VERP addresses made by earlier versions still verify."""

from __future__ import annotations

import base64
import hashlib
import hmac

from mailgw.outbound.verp import _TAG, Signer


def _old_tag(key: bytes, kind: str, value: str) -> str:
    """The tag as first written: base32 of the whole HMAC-SHA256, lowercase, cut to _TAG."""
    digest = hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii").lower().rstrip("=")[:_TAG]


def test_tag_equals_the_whole_digest_encoding():
    signer = Signer(b"secret", "desk.test")
    for i in range(2000):
        value = f"mailgw.{i}.1764201600.{i:012x}"
        assert signer._tag("mid", value) == _old_tag(b"secret", "mid", value)
        assert signer._tag("verp", str(i)) == _old_tag(b"secret", "verp", str(i))


def test_old_identifiers_still_verify_and_forged_ones_do_not():
    signer = Signer(b"secret", "desk.test")
    left = "mailgw.42.1764201600.0123456789ab"
    old_mid = f"{left}.{_old_tag(b'secret', 'mid', left)}@desk.test"
    assert signer.is_our_message_id(f"<{old_mid}>")
    assert not signer.is_our_message_id(old_mid.replace(".0123", ".0124"))
    old_verp = f"bounces+{1234:x}-{_old_tag(b'secret', 'verp', '1234')}@example.com"
    assert signer.verp_article(old_verp) == 1234
    assert signer.verp_address(1234, "support@example.com") == old_verp
    assert signer.verp_article(old_verp.replace("4d2-", "4d3-")) is None
    assert Signer(b"other", "desk.test").verp_article(old_verp) is None
    new_mid = signer.message_id(7)
    assert signer.is_our_message_id(new_mid)
    assert len(new_mid.rpartition("@")[0].rpartition(".")[2]) == _TAG
