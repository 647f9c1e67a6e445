"""The listeners' event loop: uvloop when installed, asyncio's on request (decision 37)."""

from __future__ import annotations

import asyncio

import pytest

from mailgw.gateway import event_loop_name, run_loop

uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed (no wheel here)")


def _loop_module() -> str:
    seen: list[str] = []

    async def probe() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    run_loop(probe())
    return seen[0]


def test_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILGW_EVENT_LOOP", raising=False)
    assert event_loop_name() == "uvloop"
    assert _loop_module().startswith("uvloop")


def test_asyncio_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILGW_EVENT_LOOP", " AsyncIO ")
    assert event_loop_name() == "asyncio"
    assert _loop_module().startswith("asyncio")


def test_gateway_serves_smtp_on_uvloop(gateway, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The running gateway says which loop it serves SMTP on, and mail goes through it."""
    import smtplib

    monkeypatch.delenv("MAILGW_EVENT_LOOP", raising=False)
    gateway.start()
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as c:
        c.sendmail("a@example.org", ["support@example.com"],
                   b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n")
    assert "event loop: uvloop" in gateway.output()
