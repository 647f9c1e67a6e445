"""SQLite's WAL is checkpointed by one thread of the gateway, not by whichever connection
commits (issue 8, session 6; decision 33)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from mailgw.store.db import GATEWAY_AUTOCHECKPOINT, WalCheckpointer, make_engine

PAGE = 4096


def _store(tmp_path: Path, **kw):  # type: ignore[no-untyped-def]
    db = tmp_path / "s.db"
    engine = make_engine(f"sqlite:///{db}", **kw)
    with engine.begin() as c:
        c.exec_driver_sql("CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB)")
    return engine, db


def _write(engine, pages: int) -> None:  # type: ignore[no-untyped-def]
    with engine.begin() as c:
        for _ in range(pages // 8):
            c.exec_driver_sql("INSERT INTO blobs (data) VALUES (?)", (os.urandom(8 * PAGE),))


def test_a_gateways_commits_leave_the_checkpoint_to_the_checkpointer(tmp_path):
    # Given the engine a gateway makes, and 2,000 pages committed (twice SQLite's default
    # automatic checkpoint, which the committing connection would have run)
    engine, db = _store(tmp_path, wal_autocheckpoint=GATEWAY_AUTOCHECKPOINT)
    _write(engine, 2000)
    # Then the pages are still in the WAL only: nothing was copied into the database file
    assert db.stat().st_size < 100 * PAGE
    # When the checkpointer makes a pass
    raw = engine.raw_connection()
    busy, wal_pages, copied = WalCheckpointer(engine).checkpoint(raw.driver_connection)
    raw.close()
    # Then it copies them all, and the database file has them
    assert busy == 0 and wal_pages == copied >= 2000
    assert db.stat().st_size > 2000 * PAGE
    engine.dispose()


def test_other_engines_keep_sqlites_automatic_checkpoint(tmp_path):
    # mailgw deliver, the CLI, the tests: no checkpointer runs beside them
    engine, db = _store(tmp_path)
    _write(engine, 2000)
    assert db.stat().st_size > 1000 * PAGE
    engine.dispose()


def test_the_wal_starts_over_once_it_grew_past_the_restart_size(tmp_path):
    engine, _ = _store(tmp_path, wal_autocheckpoint=GATEWAY_AUTOCHECKPOINT)
    ckpt = WalCheckpointer(engine, restart_pages=1000)
    raw = engine.raw_connection()
    conn = raw.driver_connection
    # Given a WAL of 1,200 pages, checkpointed with a restart
    _write(engine, 1200)
    ckpt.checkpoint(conn)
    assert ckpt.restarts == 1
    # When the next transaction commits 80 pages
    _write(engine, 80)
    # Then they were written at the start of the WAL, not after the 1,200
    _, wal_pages, _ = ckpt.checkpoint(conn)
    assert wal_pages < 200
    raw.close()
    engine.dispose()


def test_the_checkpointer_thread_copies_while_running_and_gives_its_connection_back(tmp_path):
    engine, db = _store(tmp_path, wal_autocheckpoint=GATEWAY_AUTOCHECKPOINT)
    stop = threading.Event()
    ckpt = WalCheckpointer(engine, interval=0.01)
    t = threading.Thread(target=ckpt.run, args=(stop,))
    t.start()
    _write(engine, 2000)
    for _ in range(500):
        if db.stat().st_size > 2000 * PAGE:
            break
        stop.wait(0.01)
    stop.set()
    t.join()
    assert db.stat().st_size > 2000 * PAGE and ckpt.passes > 0
    # Its short busy timeout (for RESTART) stayed on its own connection
    with engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 60000
    engine.dispose()
