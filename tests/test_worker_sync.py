"""SQLite durability per role (docs/architecture.md, decision 36): the worker's engine commits
with ``synchronous=NORMAL``, everything that answers a client or sends mail with ``FULL``."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mailgw.store.db import make_engine, migrate

FULL, NORMAL = 2, 1  # PRAGMA synchronous's values


def _pragma(engine, name: str):  # type: ignore[no-untyped-def]
    conn = engine.raw_connection()  # no transaction (SQLAlchemy's would BEGIN IMMEDIATE)
    try:
        return conn.cursor().execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


def _sync(engine) -> int:  # type: ignore[no-untyped-def]
    return _pragma(engine, "synchronous")


def test_make_engine_synchronous(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    full, normal = make_engine(url), make_engine(url, synchronous="NORMAL")
    try:
        migrate(full)
        assert _sync(full) == FULL
        assert _sync(normal) == NORMAL
        # Every connection of the pool, not only the first.
        a, b = normal.raw_connection(), normal.raw_connection()
        try:
            for c in (a, b):
                assert c.cursor().execute("PRAGMA synchronous").fetchone()[0] == NORMAL
                assert c.cursor().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            a.close()
            b.close()
    finally:
        full.dispose()
        normal.dispose()
    with pytest.raises(ValueError):
        make_engine(url, synchronous="OFF")


def test_roles_engines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``mailgw run``: the worker gets a NORMAL engine, the sender (and the intake, the
    scheduler: ``engine``) a FULL one. The worker's commit is made durable by the sender's
    lease commit (FULL) before any acknowledgement leaves."""
    import mailgw.gateway as gw
    from mailgw.home import init_home
    from mailgw.settings import Home, load_settings

    init_home(tmp_path / "home")
    home = Home.resolve(str(tmp_path / "home"))
    settings = load_settings(home).model_copy(
        update={"store_url": f"sqlite:///{tmp_path / 'store.db'}"})
    seen: dict[str, int] = {}
    stop = threading.Event()

    class FakeWorker:
        def __init__(self, engine, *a, **kw):  # type: ignore[no-untyped-def]
            seen["worker"] = _sync(engine)

        def run(self, stop_, wake, poll):  # type: ignore[no-untyped-def]
            stop.set()

    class FakeSender:
        def __init__(self, engine, *a, **kw):  # type: ignore[no-untyped-def]
            seen["sender"] = _sync(engine)

        def run(self, stop_, wake):  # type: ignore[no-untyped-def]
            stop_.wait(10)

    monkeypatch.setattr(gw, "Worker", FakeWorker)
    monkeypatch.setattr(gw, "Sender", FakeSender)
    monkeypatch.setattr(gw.Gateway, "_wait_for_signal", lambda self: self.stop.wait(10))
    g = gw.Gateway(home, settings, roles=("worker", "sender"), stop=stop)
    assert g.run() == 0
    assert seen == {"worker": NORMAL, "sender": FULL}
