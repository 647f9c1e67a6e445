"""``mailgw sla apply``: an edited ``slas:`` config put in force on the open tickets (an SLA
added, a goal or calendar changed, an SLA removed), each change recorded; closed tickets
and a filter rule's choice left alone; a dry run changes nothing. SQLite and PostgreSQL.

Settings as in tests/test_sla_clocks.py: calendar office (Berlin, Mon-Fri 09-18), SLAs vip
(priority 1: 30/60/480), standard (queue support: 60/120/960), sales-24x7 (queue sales:
first response 240, calendar time)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgw.settings import Settings
from mailgw.sla.apply import apply_slas
from mailgw.store import models as m
from tests import test_sla_clocks as base
from tests.test_sla_clocks import CONFIG, FRI_1755, berlin, clocks, open_ticket, utc

engine = base.engine  # the fixtures of tests/test_sla_clocks.py
settings = base.settings
MON_0910 = berlin(2026, 11, 30, 9, 10)


def with_slas(*slas: dict) -> Settings:
    return Settings.model_validate({**CONFIG, "slas": list(slas)})


VIP, STANDARD, SALES = CONFIG["slas"]


def events(s: Session, t: m.Ticket) -> list[dict]:
    return [e.data for e in s.scalars(select(m.Event).where(
        m.Event.ticket_id == t.id, m.Event.type == "sla_applied").order_by(m.Event.id))]


def test_an_sla_added_to_the_config_starts_clocks_from_the_history(engine):
    before = with_slas(VIP)  # a priority-3 support ticket has no SLA
    with Session(engine) as s, s.begin():
        t = open_ticket(s, before, FRI_1755)
        done = open_ticket(s, before, FRI_1755)
        done.state = "closed"
        ids = t.id, done.id
    assert clocks_of(engine, ids[0]) == {}
    result = apply_slas(engine, with_slas(VIP, STANDARD), at=MON_0910)
    assert result.checked == 1  # the closed ticket is not looked at
    [change] = result.changes
    assert change.sla == (None, "standard")
    assert sorted(change.started) == ["standard first_response", "standard solution"]
    with Session(engine) as s:
        t = s.get(m.Ticket, ids[0])
        assert (t.sla, t.sla_reason) == ("standard", "slas[1] standard: queue support")
        cs = clocks(s, t)
        # counted from the ticket's creation, Friday 17:55: 5 min Friday + 55 Monday
        assert utc(cs["first_response"].started_at) == FRI_1755
        assert utc(cs["first_response"].due_at) == berlin(2026, 11, 30, 9, 55)
        [ev] = events(s, t)
        assert ev["sla"] == [None, "standard"] and ev["reason"] == "mailgw sla apply"
        assert clocks(s, s.get(m.Ticket, ids[1])) == {}
    # applying the same config again changes nothing
    again = apply_slas(engine, with_slas(VIP, STANDARD), at=MON_0910 + timedelta(minutes=1))
    assert (again.checked, again.changes) == (1, [])


def clocks_of(engine, ticket_id: int) -> dict:  # type: ignore[no-untyped-def]
    with Session(engine) as s:
        return clocks(s, s.get(m.Ticket, ticket_id))


def test_an_edited_goal_applies_from_the_clock_start(engine, settings):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, settings, FRI_1755)
        tid = t.id
    fr = clocks_of(engine, tid)["first_response"]
    assert (fr.goal_minutes, utc(fr.due_at)) == (60, berlin(2026, 11, 30, 9, 55))
    edited = with_slas(VIP, {**STANDARD, "first_response": 90}, SALES)
    [change] = apply_slas(engine, edited, at=MON_0910).changes
    assert change.sla == ("standard", "standard")
    assert change.retargeted == ["first_response: standard -> standard"]
    assert change.started == [] and change.cancelled == []
    fr = clocks_of(engine, tid)["first_response"]
    assert (fr.state, fr.goal_minutes) == ("running", 90)
    assert utc(fr.due_at) == berlin(2026, 11, 30, 10, 25)  # 5 Friday + 85 Monday
    assert utc(fr.started_at) == FRI_1755
    # the solution goal was not edited: that clock is untouched
    assert clocks_of(engine, tid)["solution"].goal_minutes == 960


def test_an_sla_removed_from_the_config_cancels_its_clocks(engine, settings):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, settings, FRI_1755, queue="sales")
        tid = t.id
    assert clocks_of(engine, tid)["first_response"].sla == "sales-24x7"
    [change] = apply_slas(engine, with_slas(VIP, STANDARD), at=MON_0910).changes
    assert change.sla == ("sales-24x7", None)
    assert change.cancelled == ["sales-24x7 first_response"]
    fr = clocks_of(engine, tid)["first_response"]
    assert (fr.state, fr.outcome) == ("stopped", "cancelled")


def test_a_goal_added_to_the_sla_a_ticket_has_starts_that_clock(engine, settings):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, settings, FRI_1755, queue="sales")
        tid = t.id
    assert sorted(clocks_of(engine, tid)) == ["first_response"]
    edited = with_slas(VIP, STANDARD, {**SALES, "solution": 600})
    [change] = apply_slas(engine, edited, at=MON_0910).changes
    assert change.started == ["sales-24x7 solution"]
    sol = clocks_of(engine, tid)["solution"]
    assert (sol.state, sol.goal_minutes, utc(sol.started_at)) == ("running", 600, FRI_1755)


def test_a_filter_rule_choice_is_kept_and_a_dry_run_changes_nothing(engine, settings):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, settings, FRI_1755)
        t.sla, t.sla_reason = "vip", "rule vip-customers"
        tid = t.id
    edited = with_slas(VIP, {**STANDARD, "first_response": 90}, SALES)
    dry = apply_slas(engine, edited, at=MON_0910, dry_run=True)
    assert dry.dry_run and [c.sla for c in dry.changes] == [("vip", "vip")]
    with Session(engine) as s:
        t = s.get(m.Ticket, tid)
        assert t.sla == "vip" and events(s, t) == []
        assert {c.sla for c in clocks(s, t).values()} == {"standard"}  # not switched yet
    [change] = apply_slas(engine, edited, at=MON_0910).changes
    assert change.sla == ("vip", "vip") and change.reason == "rule vip-customers"
    with Session(engine) as s:
        cs = clocks(s, s.get(m.Ticket, tid))
        assert {(c.sla, c.goal_minutes) for c in cs.values()} == {("vip", 30), ("vip", 480)}


def test_mailgw_sla_apply_json(home):
    """The command: --dry-run, --ticket, --json."""
    home.update_config(slas=[{"name": "std", "first_response": 60, "solution": 600}])
    st = home.settings()
    engine = home.engine()
    try:
        with Session(engine) as s, s.begin():
            numbers = [open_ticket(s, st, datetime.now(base.UTC) - timedelta(minutes=10)).number
                       for _ in range(3)]
    finally:
        engine.dispose()
    home.update_config(slas=[{"name": "std", "first_response": 30, "solution": 600}])
    out = json.loads(home.cli("sla", "apply", "--dry-run", "--json", check=True).stdout)
    assert (out["checked"], out["changed"], out["dry_run"]) == (3, 3, True)
    out = json.loads(home.cli("sla", "apply", "--ticket", numbers[1], "--json",
                              check=True).stdout)
    assert (out["checked"], out["changed"]) == (1, 1)
    assert out["tickets"][0]["ticket"] == numbers[1]
    assert out["tickets"][0]["retargeted"] == ["first_response: std -> std"]
    text = home.cli("sla", "apply", check=True).stdout.decode()
    assert "3 ticket(s) checked, 2 changed" in text


NO_FIRST_RESPONSE = {"name": "standard", "calendar": "office", "update": 120, "solution": 960,
                     "applies_to": {"queues": ["support"]}}


def open_clocks(engine, tid: int) -> list[tuple[str, str, str]]:  # type: ignore[no-untyped-def]
    with Session(engine) as s:
        return sorted((c.target, c.sla, c.state) for c in s.scalars(select(m.SlaClock).where(
            m.SlaClock.ticket_id == tid, m.SlaClock.state.in_(("running", "paused")))))


def test_a_first_response_goal_added_does_not_run_beside_the_update_clock(engine):
    """Under an SLA without a first-response goal a new ticket's opening message starts
    update#1; adding the goal must not start first_response beside it (two clocks, two
    escalations, for one unanswered message)."""
    with Session(engine) as s, s.begin():
        tid = open_ticket(s, with_slas(VIP, NO_FIRST_RESPONSE, SALES), FRI_1755).id
    assert [c[0] for c in open_clocks(engine, tid)] == ["solution", "update"]
    apply_slas(engine, with_slas(VIP, {**NO_FIRST_RESPONSE, "first_response": 60}, SALES),
               at=MON_0910)
    assert [c[0] for c in open_clocks(engine, tid)] == ["solution", "update"]


def pending_ticket(engine, st: Settings) -> int:  # type: ignore[no-untyped-def]
    from mailgw import ticket_events

    with Session(engine) as s, s.begin():
        t = open_ticket(s, st, FRI_1755)
        t.state = "pending"
        ticket_events.ticket_changed(s, st, t, {"state": ("new", "pending")},
                                     at=FRI_1755 + timedelta(minutes=2))
        return t.id


def test_pause_states_edited_pause_or_resume_the_clocks(engine, settings):
    tid = pending_ticket(engine, settings)
    assert {c[2] for c in open_clocks(engine, tid)} == {"paused"}  # standard pauses in pending
    [change] = apply_slas(engine, with_slas(VIP, {**STANDARD, "pause_states": []}, SALES),
                          at=MON_0910).changes
    assert sorted(change.resumed) == ["first_response", "solution"]
    assert {c[2] for c in open_clocks(engine, tid)} == {"running"}
    with Session(engine) as s:
        [ev] = events(s, s.get(m.Ticket, tid))
        assert sorted(ev["resumed"]) == ["first_response", "solution"]
    # and back: pending pauses again
    [change] = apply_slas(engine, with_slas(VIP, STANDARD, SALES),
                          at=MON_0910 + timedelta(minutes=5)).changes
    assert sorted(change.paused) == ["first_response", "solution"]
    assert {c[2] for c in open_clocks(engine, tid)} == {"paused"}


def test_a_pending_ticket_moved_to_an_sla_that_does_not_pause_runs(engine, settings):
    tid = pending_ticket(engine, settings)
    other = {**STANDARD, "name": "support-24x7", "pause_states": []}
    apply_slas(engine, with_slas(VIP, other, SALES), at=MON_0910)
    assert open_clocks(engine, tid) == [("first_response", "support-24x7", "running"),
                                        ("solution", "support-24x7", "running")]


def test_each_chunk_takes_its_own_time(engine, settings, monkeypatch):
    """A long run must not stamp a later chunk with the time the run began: a worker may
    have moved that ticket's clocks meanwhile, and the ledger would go back in time."""
    from mailgw import ticket_events
    from mailgw.sla import apply as apply_mod

    start = datetime.now(base.UTC) - timedelta(hours=2)
    with Session(engine) as s, s.begin():
        ids = [open_ticket(s, settings, start).id for _ in range(2)]
    monkeypatch.setattr(apply_mod, "CHUNK", 1)
    real_chunk, calls = apply_mod._chunk, []

    def chunk(*args, **kw):  # type: ignore[no-untyped-def]
        if calls == [1]:  # between the two chunks, the worker pends ticket 2, now
            with Session(engine) as s, s.begin():
                t = s.get(m.Ticket, ids[1])
                t.state = "pending"
                ticket_events.ticket_changed(s, settings, t, {"state": ("new", "pending")},
                                             at=datetime.now(base.UTC))
        calls.append(1)
        return real_chunk(*args, **kw)

    monkeypatch.setattr(apply_mod, "_chunk", chunk)
    result = apply_slas(engine, with_slas(VIP, {**STANDARD, "first_response": 90}, SALES))
    assert result.checked == 2
    with Session(engine) as s:
        backwards = [(g.start_at, g.end_at) for g in s.scalars(select(m.SlaSegment).where(
            m.SlaSegment.ticket_id.in_(ids))) if g.end_at is not None and
            utc(g.end_at) < utc(g.start_at)]
        assert backwards == []


def test_a_reason_change_alone_is_recorded_and_closed_tickets_named_are_skipped(engine,
                                                                                settings):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, settings, FRI_1755)
        closed = open_ticket(s, settings, FRI_1755)
        closed.state = "closed"
        tid, numbers = t.id, [t.number, closed.number, "2099010100000001"]
    # standard moves from slas[1] to slas[0]: same SLA, same clocks, another reason
    result = apply_slas(engine, with_slas(STANDARD, VIP, SALES), at=MON_0910, numbers=numbers)
    [change] = result.changes
    assert change.sla == ("standard", "standard")
    assert change.reason == "slas[0] standard: queue support"
    assert result.skipped == numbers[1:]
    with Session(engine) as s:
        assert len(events(s, s.get(m.Ticket, tid))) == 1


def test_postgresql_a_deadlock_with_a_worker_is_retried(engine, settings):
    """apply locks a chunk's tickets in id order; a worker's batch may hold a later one and
    then want an earlier one. PostgreSQL aborts one of the two; apply takes the chunk again."""
    import threading
    import time

    import pytest
    from sqlalchemy import update

    if engine.dialect.name != "postgresql":
        pytest.skip("row locks: PostgreSQL")
    with Session(engine) as s, s.begin():
        a, b = open_ticket(s, settings, FRI_1755).id, open_ticket(s, settings, FRI_1755).id
    worker = engine.connect()
    tx = worker.begin()
    worker.execute(update(m.Ticket).where(m.Ticket.id == b).values(title="w"))
    errors: dict[str, Exception] = {}

    def run() -> None:
        try:
            apply_slas(engine, with_slas(VIP, {**STANDARD, "first_response": 90}, SALES),
                       at=MON_0910)
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            errors["apply"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.5)  # apply holds a and waits for b
    try:
        worker.execute(update(m.Ticket).where(m.Ticket.id == a).values(title="w"))
        tx.commit()
    except Exception:  # noqa: BLE001 - the worker's side was chosen: it rolls back
        tx.rollback()
    worker.close()
    thread.join(60)
    assert "apply" not in errors, errors
    for tid in (a, b):
        assert clocks_of(engine, tid)["first_response"].goal_minutes == 90
