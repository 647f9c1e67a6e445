"""Signed reply addresses (mailgw/agent_mail/tokens.py): what verifies and what does not."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest

from mailgw.agent_mail import tokens
from mailgw.agent_mail.tokens import (
    TokenError,
    find_token_address,
    make_address,
    make_token,
    verify_token,
)
from mailgw.settings import Settings

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
K1 = {"id": "k1", "secret": "first-secret-0123456789"}
K2 = {"id": "k2", "secret": "second-secret-0123456789"}


def settings(keys=(K1,), agents=None, **agent_mail) -> Settings:  # type: ignore[no-untyped-def]
    return Settings.model_validate({
        "queues": [{"name": "support", "addresses": ["support@example.com"]},
                   {"name": "billing", "addresses": ["billing@example.com"]}],
        "agents": agents if agents is not None else [
            {"name": "Alice.Smith", "addresses": ["alice@agents.test"], "queues": ["support"]},
            {"name": "bob", "addresses": ["bob@agents.test"], "queues": ["support"]}],
        "agent_mail": {"keys": list(keys), **agent_mail},
    })


def test_token_round_trip_survives_lowercasing_and_fits_a_local_part():
    s = settings()
    alice = s.agent("Alice.Smith")
    address = make_address(s, s.queue("support"), "t", alice, 1234567, NOW)
    local = address.rpartition("@")[0]
    assert address.startswith("support+t.") and address.endswith("@example.com")
    assert len(local) <= 64  # RFC 5321 limit of a local part
    assert local == local.lower()
    # A mail system that upper- or lower-cases the address does not break the token.
    for seen in (address, address.upper()):
        kind, token, queue = find_token_address(s, ["someone@else.test", f"<{seen}>"])
        tok = verify_token(s, kind, token, NOW)
        assert (tok.kind, tok.agent.name, tok.ticket_id, tok.key_id) == ("t", "Alice.Smith",
                                                                          1234567, "k1")
        assert queue.name == "support"


def test_reply_and_comment_tokens_are_not_interchangeable():
    s = settings()
    token = make_token(s, "t", s.agent("bob"), 7, NOW)
    assert verify_token(s, "t", token, NOW).kind == "t"
    with pytest.raises(TokenError, match="altered"):
        verify_token(s, "c", token, NOW)


def test_tampered_token_is_refused_at_every_position():
    s = settings()
    token = make_token(s, "t", s.agent("bob"), 42, NOW)
    for i in range(len(token)):
        swapped = token[:i] + ("a" if token[i] != "a" else "b") + token[i + 1:]
        with pytest.raises(TokenError):
            verify_token(s, "t", swapped, NOW)


def test_token_with_another_ticket_id_and_the_same_mac_is_refused():
    # The MAC covers the ticket: a token of ticket 42 edited to name ticket 43 is worthless.
    s = settings()
    token = make_token(s, "t", s.agent("bob"), 42, NOW).upper()
    data = base64.b32decode(token + "=" * (-len(token) % 8))
    assert data[-11] == 42  # the varint of the ticket id, just before the 10-byte MAC
    forged = data[:-11] + bytes([43]) + data[-10:]
    with pytest.raises(TokenError, match="altered"):
        verify_token(s, "t", base64.b32encode(forged).decode().rstrip("=").lower(), NOW)


def test_token_expires_after_max_age_days():
    s = settings(max_age_days=30)
    token = make_token(s, "t", s.agent("bob"), 1, NOW)
    assert verify_token(s, "t", token, NOW + timedelta(days=30)).ticket_id == 1
    with pytest.raises(TokenError, match="expired"):
        verify_token(s, "t", token, NOW + timedelta(days=31))
    with pytest.raises(TokenError, match="future"):
        verify_token(s, "t", token, NOW - timedelta(days=3))


def test_key_rotation_new_key_signs_old_key_verifies_until_removed():
    old = settings(keys=(K1,))
    token_old = make_token(old, "t", old.agent("bob"), 5, NOW)
    rotating = settings(keys=(K2, K1))
    assert verify_token(rotating, "t", token_old, NOW).key_id == "k1"
    token_new = make_token(rotating, "t", rotating.agent("bob"), 5, NOW)
    assert verify_token(rotating, "t", token_new, NOW).key_id == "k2"
    done = settings(keys=(K2,))
    assert verify_token(done, "t", token_new, NOW).ticket_id == 5
    with pytest.raises(TokenError, match="no longer configured"):
        verify_token(done, "t", token_old, NOW)


def test_same_key_id_with_another_secret_does_not_verify():
    token = make_token(settings(), "t", settings().agent("bob"), 5, NOW)
    other = settings(keys=({"id": "k1", "secret": "a-different-secret-xyz"},))
    with pytest.raises(TokenError, match="altered"):
        verify_token(other, "t", token, NOW)


def test_removed_agent_token_is_refused():
    s = settings()
    token = make_token(s, "t", s.agent("bob"), 5, NOW)
    only_alice = settings(agents=[{"name": "Alice.Smith", "addresses": ["alice@agents.test"],
                                   "queues": ["support"]}])
    with pytest.raises(TokenError, match="no longer configured"):
        verify_token(only_alice, "t", token, NOW)


def test_garbage_tokens_are_refused_not_crashing():
    s = settings()
    for junk in ("", "x", "!!!!", "a" * 36, "0189", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"):
        with pytest.raises(TokenError):
            verify_token(s, "t", junk, NOW)


def test_find_token_address_only_for_our_queues_and_kinds():
    s = settings()
    assert find_token_address(s, ["support@example.com", "support+foo@example.com"]) is None
    assert find_token_address(s, ["support+x.abc@example.com"]) is None
    assert find_token_address(s, ["stranger+t.abc@other.test"]) is None
    assert find_token_address(s, ["billing+c.abc@example.com"])[:2] == ("c", "abc")


def test_agent_mail_config_is_validated():
    with pytest.raises(Exception, match="authserv_id"):
        settings(require_auth="dkim")
    with pytest.raises(Exception, match="unique"):
        settings(keys=(K1, K1))
    with pytest.raises(Exception, match="secret"):
        settings(keys=({"id": "k1", "secret": "short"},))
    assert not Settings.model_validate(
        {"queues": [{"name": "q", "addresses": ["q@x.test"]}]}).agent_mail.enabled
    assert tokens.KINDS == ("t", "c")
