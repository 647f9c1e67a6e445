"""SQLite: how long a worker woken with less than a batch waits for the intake's next commits
(``Worker._gather``; issue 8, session 7): while commits keep coming, each within
``linger_gap`` of the last, up to ``linger`` in all; once none comes for ``linger_gap``, it
claims what is there."""

from __future__ import annotations

import threading
import time

import pytest

from mailgw.worker import Worker
from tests.helpers import Harness, mail


@pytest.fixture
def hx(home):  # type: ignore[no-untyped-def]
    h = Harness(home)
    if h.engine.dialect.name != "sqlite":
        h.close()
        pytest.skip("the minimum batch is SQLite's (its one write lock)")
    yield h
    h.close()


def _start(hx, worker, wake):  # type: ignore[no-untyped-def]
    hx.worker = worker
    batches: list[tuple[float, list[int]]] = []
    parse = worker._parse

    def _parse(ids, ctx):  # type: ignore[no-untyped-def]
        batches.append((time.monotonic(), list(ids)))
        return parse(ids, ctx)
    worker._parse = _parse
    stop = threading.Event()
    t = threading.Thread(target=worker.run, args=(stop, wake, 0.05), daemon=True)
    t.start()
    return stop, t, batches


def _finish(hx, stop, wake, t) -> None:  # type: ignore[no-untyped-def]
    for _ in range(400):
        if hx.pending() == 0:
            break
        time.sleep(0.05)
    stop.set()
    wake.set()
    t.join(20)


def test_defaults() -> None:
    from mailgw.worker import LINGER, LINGER_GAP, MIN_BATCH_SHARE

    assert LINGER_GAP < LINGER
    assert MIN_BATCH_SHARE == 1.0  # a full batch is what a worker waits for (session 5: half)


@pytest.mark.timeout(60)
def test_no_more_commits_the_worker_claims_after_the_gap_not_the_whole_linger(hx):
    worker = Worker(hx.engine, hx.worker.context, batch_size=8, max_attempts=3,
                    linger=30.0, linger_gap=0.2)
    [only] = hx.put(mail("alone", msgid="g1@c"))
    wake = threading.Event()
    t0 = time.monotonic()
    wake.set()
    stop, t, batches = _start(hx, worker, wake)
    _finish(hx, stop, wake, t)
    assert [ids for _, ids in batches] == [[only]]
    assert batches[0][0] - t0 < 10  # not the 30 s linger
    assert hx.inbound(only).state == "done"


@pytest.mark.timeout(60)
def test_commits_that_keep_coming_join_the_batch_beyond_the_gap(hx):
    """Three commits 0.4 s apart (each within the 1 s gap, 0.8 s in all): one batch."""
    worker = Worker(hx.engine, hx.worker.context, batch_size=8, max_attempts=3,
                    linger=30.0, linger_gap=1.0)
    gathering = threading.Event()
    gather = worker._gather

    def _gather(n):  # type: ignore[no-untyped-def]
        gathering.set()
        return gather(n)
    worker._gather = _gather
    [first] = hx.put(mail("one", msgid="k1@c"))
    wake = threading.Event()
    wake.set()
    stop, t, batches = _start(hx, worker, wake)
    assert gathering.wait(20)
    ids = [first]
    for n in (2, 3):
        time.sleep(0.4)
        ids += hx.put(mail(f"more {n}", msgid=f"k{n}@c"))
        wake.set()  # what the intake does after its commit
    _finish(hx, stop, wake, t)
    assert [b for _, b in batches] == [ids]
    assert [hx.inbound(i).state for i in ids] == ["done"] * 3


def test_a_gathering_worker_does_not_count_the_rows_again_on_every_commit(hx):
    """Commits every few ms (200 msg/s): a look each was most of the gathering's CPU. The
    rows are counted again at most every ``LOOK_EVERY`` (10 ms): here, commits without end
    for the 50 ms of the linger."""
    import mailgw.worker

    every = getattr(mailgw.worker, "LOOK_EVERY", 0.01)
    worker = Worker(hx.engine, hx.worker.context, batch_size=8, max_attempts=3,
                    linger=0.05, linger_gap=0.02)

    class Busy:  # the intake committing all the time: every wait is woken at once
        def wait(self, timeout=None):  # type: ignore[no-untyped-def]
            time.sleep(0.0002)
            return True

        def clear(self) -> None:
            pass

    looks = []
    worker._wake = Busy()  # type: ignore[assignment]
    worker._waiting = lambda stamp: looks.append(stamp) or 1  # type: ignore[method-assign]
    t0 = time.monotonic()
    worker._gather(1)
    assert time.monotonic() - t0 >= 0.05
    assert 1 <= len(looks) <= 0.05 / every + 2, len(looks)
