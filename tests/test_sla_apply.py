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
