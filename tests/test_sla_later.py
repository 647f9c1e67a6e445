"""An SLA that applies to a ticket later (a priority or queue change, a filter rule's ``sla:``
on a follow-up, an agent command): its clocks are counted from the ticket's history, as
OTRS/Znuny compute escalation times from the history when an SLA is set. On SQLite and
PostgreSQL.

Calendar office: Europe/Berlin, Mon-Fri 09:00-18:00 (CET = UTC+1 in Nov/Dec 2026). SLA
``vip`` (priority 1): first response 30, update 60, solution 480 business minutes, levels
75 % and 100 %. With settings ``LATE`` only vip is configured, so a priority-3 ticket in
support has no SLA until its priority becomes 1.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgw import ticket_events
from mailgw.settings import Settings
from mailgw.store import models as m
from tests import test_sla_clocks as base
from tests.test_sla_clocks import (
    CONFIG,
    FRI_1755,
    MIN,
    agent_answers,
    article,
    berlin,
    clocks,
    customer_says,
    open_ticket,
    segments,
    utc,
)

engine = base.engine  # the fixtures of tests/test_sla_clocks.py
settings = base.settings


@pytest.fixture
def late() -> Settings:
    return Settings.model_validate({**CONFIG, "slas": CONFIG["slas"][:1]})


def record_state(s: Session, st: Settings, t: m.Ticket, new: str, at: datetime,
                 reason: str = "mailgw tickets state") -> None:
    """A state change as the CLI, the worker and the pending reminder record it: an event,
    then the SLA code told."""
    old, t.state = t.state, new
    s.add(m.Event(type="state_changed", ticket_id=t.id, created_at=at,
                  data={"old": old, "new": new, "reason": reason}))
    ticket_events.ticket_changed(s, st, t, {"state": (old, new)}, at=at, reason=reason)


def to_priority_1(s: Session, st: Settings, t: m.Ticket, at: datetime) -> None:
    old, t.priority = t.priority, 1
    ticket_events.ticket_changed(s, st, t, {"priority": (old, 1)}, at=at, reason="agent bob")


def test_no_sla_then_one_counts_every_clock_from_the_history(engine, late):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, late, FRI_1755)
        assert t.sla is None and clocks(s, t) == {}
        to_priority_1(s, late, t, berlin(2026, 11, 30, 9, 10))
        assert (t.sla, t.sla_reason) == ("vip", "slas[0] vip: priority 1")
        cs = clocks(s, t)
        assert sorted(cs) == ["first_response", "solution"]
        fr, sol = cs["first_response"], cs["solution"]
        # first response counted from the ticket's creation: 5 min Friday + 25 Monday
        assert utc(fr.started_at) == FRI_1755
        assert utc(fr.due_at) == berlin(2026, 11, 30, 9, 25)
        assert (fr.state, fr.goal_minutes, fr.used_seconds) == ("running", 30, 0)
        assert utc(fr.running_since) == FRI_1755
        # 75 % = 22.5 min: 5 Friday + 17.5 Monday
        assert fr.next_level == 0
        assert utc(fr.next_notice_at) == berlin(2026, 11, 30, 9, 17, 30)
        # solution from creation too: 480 min = 5 Fri + 475 Mon -> Mon 16:55
        assert utc(sol.started_at) == FRI_1755
        assert utc(sol.due_at) == berlin(2026, 11, 30, 16, 55)
        [seg] = segments(s, fr)
        assert (seg.kind, utc(seg.start_at), seg.end_at) == ("running", FRI_1755, None)
        assert seg.reason.startswith("ticket opened by a message from alice@customer.test; "
                                     "SLA vip applies since 2026-11-30 08:10 UTC")
        assert "counted from the ticket's history" in seg.reason
        # the agent answers at 09:20: met, 25 min used
        agent_answers(s, late, t, berlin(2026, 11, 30, 9, 20))
        fr = clocks(s, t)["first_response"]
        assert (fr.state, fr.outcome, fr.used_seconds) == ("stopped", "met", 25 * MIN)


def test_an_sla_set_after_the_goal_passed_is_breached_at_the_real_instant(home):
    from mailgw.outbound.render import Renderer
    from mailgw.sla.sweep import Sweeper

    home.update_config(calendars=CONFIG["calendars"], agents=CONFIG["agents"],
                       slas=CONFIG["slas"][:1])
    st = home.settings()
    engine = home.engine()
    try:
        with Session(engine) as s, s.begin():
            t = open_ticket(s, st, FRI_1755)
            t.owner = "bob"
            to_priority_1(s, st, t, berlin(2026, 11, 30, 10, 0))
            fr = clocks(s, t)["first_response"]
            # due Mon 09:25, 35 min ago: the 75 % warning passed too, but only the breach
            # is told (level 1); its notice is due at once
            assert utc(fr.due_at) == berlin(2026, 11, 30, 9, 25)
            assert fr.next_level == 1
            assert utc(fr.next_notice_at) == berlin(2026, 11, 30, 9, 25)
            assert fr.breached_at is None
            clock_id, ticket_id = fr.id, t.id
        result = Sweeper(engine, st, Renderer(home.path / "templates")).sweep(
            berlin(2026, 11, 30, 10, 1))
        assert [(f.clock_id, f.kind, f.percent) for f in result.fired
                if f.ticket_id == ticket_id] == [(clock_id, "breach", 100)]
        with Session(engine) as s:
            fr = s.get(m.SlaClock, clock_id)
            assert utc(fr.breached_at) == berlin(2026, 11, 30, 9, 25)
            assert [(n.level, n.kind) for n in s.scalars(select(m.SlaNotice).where(
                m.SlaNotice.clock_id == clock_id))] == [(1, "breach")]
    finally:
        engine.dispose()


def test_warnings_passed_before_the_sla_applied_are_not_all_sent(late):
    from mailgw.sla.clocks import _first_level

    sla = Settings.model_validate({**CONFIG, "slas": [{
        "name": "x", "first_response": 100, "levels": [
            {"percent": 50}, {"percent": 75}, {"percent": 100}, {"percent": 150}]}]}).slas[0]
    assert _first_level(sla, 100, 0) == 0
    assert _first_level(sla, 100, 49 * MIN) == 0
    assert _first_level(sla, 100, 80 * MIN) == 1  # the last warning passed
    assert _first_level(sla, 100, 100 * MIN) == 2  # the breach, not the warnings
    assert _first_level(sla, 100, 200 * MIN) == 2  # both breach levels, in order


def test_the_update_clock_starts_at_the_oldest_unanswered_message(engine, late):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, late, FRI_1755)
        agent_answers(s, late, t, berlin(2026, 11, 30, 9, 30))
        customer_says(s, late, t, berlin(2026, 11, 30, 10, 0))
        customer_says(s, late, t, berlin(2026, 11, 30, 10, 30), automatic=True)
        customer_says(s, late, t, berlin(2026, 11, 30, 11, 0))
        to_priority_1(s, late, t, berlin(2026, 11, 30, 11, 30))
        cs = clocks(s, t)
        # answered before: no first-response clock; the update clock from 10:00 (60 min)
        assert sorted(cs) == ["solution", "update#1"]
        upd = cs["update#1"]
        assert utc(upd.started_at) == berlin(2026, 11, 30, 10, 0)
        assert utc(upd.due_at) == berlin(2026, 11, 30, 11, 0)
        assert upd.next_level == 1  # already breached: the breach notice is next
        assert "customer message from alice@customer.test" in segments(s, upd)[0].reason
        agent_answers(s, late, t, berlin(2026, 11, 30, 11, 45))
        upd = clocks(s, t)["update#1"]
        assert (upd.outcome, upd.used_seconds, utc(upd.breached_at)) == (
            "breached", 105 * MIN, berlin(2026, 11, 30, 11, 0))


def test_a_ticket_answered_and_not_written_to_since_gets_only_its_solution_clock(engine, late):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, late, FRI_1755)
        agent_answers(s, late, t, berlin(2026, 11, 30, 9, 30))
        to_priority_1(s, late, t, berlin(2026, 11, 30, 11, 0))
        cs = clocks(s, t)
        assert sorted(cs) == ["solution"]
        # from creation, one running span: 5 Fri + 475 Mon -> Mon 16:55
        assert utc(cs["solution"].due_at) == berlin(2026, 11, 30, 16, 55)


def test_pending_spans_in_the_history_are_not_counted(engine, late):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, late, FRI_1755)
        record_state(s, late, t, "pending", berlin(2026, 11, 30, 9, 10), "agent bob: #pending")
        record_state(s, late, t, "open", berlin(2026, 11, 30, 14, 0), "customer follow-up")
        to_priority_1(s, late, t, berlin(2026, 11, 30, 14, 10))
        fr = clocks(s, t)["first_response"]
        # 15 min counted before the pause (5 Fri + 10 Mon), then from 14:00: due 14:15
        assert fr.used_seconds == 15 * MIN
        assert utc(fr.running_since) == berlin(2026, 11, 30, 14, 0)
        assert utc(fr.due_at) == berlin(2026, 11, 30, 14, 15)
        got = [(x.kind, utc(x.start_at), utc(x.end_at), x.counted_seconds)
               for x in segments(s, fr)]
        assert got == [
            ("running", FRI_1755, berlin(2026, 11, 30, 9, 10), 15 * MIN),
            ("paused", berlin(2026, 11, 30, 9, 10), berlin(2026, 11, 30, 14, 0), 0),
            ("running", berlin(2026, 11, 30, 14, 0), None, None)]
        paused = segments(s, fr)[1]
        assert paused.reason == "state pending (agent bob: #pending)"
        sol = clocks(s, t)["solution"]
        # 480 - 15 = 465 min from Mon 14:00: 240 Monday, 225 Tuesday -> Tue 12:45
        assert sol.used_seconds == 15 * MIN
        assert utc(sol.due_at) == berlin(2026, 12, 1, 12, 45)


def test_a_pending_ticket_gets_paused_clocks(engine, late):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, late, FRI_1755)
        record_state(s, late, t, "pending", berlin(2026, 11, 30, 9, 10))
        to_priority_1(s, late, t, berlin(2026, 11, 30, 15, 0))
        for c in clocks(s, t).values():
            assert (c.state, c.used_seconds, c.due_at, c.next_notice_at) == (
                "paused", 15 * MIN, None, None)
            run, paused = segments(s, c)
            assert (paused.kind, utc(paused.start_at), paused.end_at) == (
                "paused", berlin(2026, 11, 30, 9, 10), None)
        # leaving pending resumes them with 15 min used
        record_state(s, late, t, "open", berlin(2026, 12, 1, 10, 0))
        assert utc(clocks(s, t)["first_response"].due_at) == berlin(2026, 12, 1, 10, 15)


def test_closed_spans_do_not_count_for_the_solution_and_end_the_first_response(engine, late):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, late, FRI_1755)
        record_state(s, late, t, "closed", berlin(2026, 11, 30, 9, 0))
        # the customer writes again Tuesday 09:00: the worker reopens the ticket
        s.add(m.Event(type="state_changed", ticket_id=t.id, created_at=berlin(2026, 12, 1, 9),
                      data={"old": "closed", "new": "open", "reason": "customer follow-up"}))
        customer_says(s, late, t, berlin(2026, 12, 1, 9, 0))
        assert clocks(s, t) == {}
        to_priority_1(s, late, t, berlin(2026, 12, 1, 9, 20))
        cs = clocks(s, t)
        # the close ended what a first response would have been; the new message waits
        assert sorted(cs) == ["solution", "update#1"]
        assert utc(cs["update#1"].started_at) == berlin(2026, 12, 1, 9, 0)
        assert utc(cs["update#1"].due_at) == berlin(2026, 12, 1, 10, 0)
        sol = cs["solution"]
        # 5 min Friday; closed Mon 09:00 - Tue 09:00 not counted
        assert sol.used_seconds == 5 * MIN
        assert utc(sol.due_at) == berlin(2026, 12, 1, 16, 55)
        assert [x.kind for x in segments(s, sol)] == ["running", "paused", "running"]
        assert segments(s, sol)[1].reason == "state closed (mailgw tickets state)"


def test_a_rule_setting_the_sla_on_a_follow_up_starts_the_clocks(engine, late):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, late, FRI_1755)
        # the filter rule chose vip (mailgw/filters/apply.py) before the article is told
        t.sla, t.sla_reason = "vip", "rule urgent"
        customer_says(s, late, t, berlin(2026, 11, 30, 9, 5))
        cs = clocks(s, t)
        assert sorted(cs) == ["first_response", "solution"]
        assert utc(cs["first_response"].started_at) == FRI_1755
        assert (t.sla, t.sla_reason) == ("vip", "rule urgent")


def test_nothing_is_backfilled_twice_or_on_a_ticket_that_had_its_sla(engine, settings):
    with Session(engine) as s, s.begin():
        # sales-24x7 has only a first-response goal: once answered, no clock is open
        t = open_ticket(s, settings, FRI_1755, queue="sales")
        agent_answers(s, settings, t, berlin(2026, 11, 30, 9, 0))
        assert [c.state for c in clocks(s, t).values()] == ["stopped"]
        # a change that selects the same SLA again starts nothing
        t.priority = 2
        ticket_events.ticket_changed(s, settings, t, {"priority": (3, 2)},
                                     at=berlin(2026, 11, 30, 9, 5))
        customer_says(s, settings, t, berlin(2026, 11, 30, 9, 6))
        assert len(clocks(s, t)) == 1
        # an SLA with the same clocks open: no second clock of a target
        t2 = open_ticket(s, settings, FRI_1755)
        to_priority_1(s, settings, t2, berlin(2026, 11, 30, 9, 10))
        assert sorted(clocks(s, t2)) == ["first_response", "solution"]
        # a closed ticket that gets an SLA gets no clocks
        late = Settings.model_validate({**CONFIG, "slas": CONFIG["slas"][:1]})
        t3 = open_ticket(s, late, FRI_1755)
        record_state(s, late, t3, "closed", berlin(2026, 11, 30, 9, 0))
        to_priority_1(s, late, t3, berlin(2026, 11, 30, 9, 10))
        assert clocks(s, t3) == {}


def test_an_sla_gaining_a_target_counts_it_from_the_history(engine, settings):
    """sales-24x7 (first response only) -> vip (also update and solution)."""
    with Session(engine) as s, s.begin():
        t = open_ticket(s, settings, FRI_1755, queue="sales")
        to_priority_1(s, settings, t, berlin(2026, 11, 30, 9, 10))
        cs = clocks(s, t)
        assert sorted(cs) == ["first_response", "solution"]
        assert (cs["first_response"].sla, cs["first_response"].cycle) == ("vip", 0)
        assert utc(cs["solution"].started_at) == FRI_1755
        assert cs["solution"].sla == "vip"


def test_article_times_after_now_are_not_history(engine, late):
    """A message stored with a later timestamp than the change (clock skew between nodes)
    is not read as history: only what happened up to the change counts."""
    with Session(engine) as s, s.begin():
        t = open_ticket(s, late, FRI_1755)
        article(s, t, berlin(2026, 11, 30, 9, 30), direction="out", sender_type="agent",
                sender="bob@example.com")
        to_priority_1(s, late, t, berlin(2026, 11, 30, 9, 10))
        assert "first_response" in clocks(s, t)


def test_through_the_worker_a_rule_on_a_follow_up(home):
    """The filter rule's ``sla:`` on a follow-up, through the worker: the ticket had no SLA,
    the follow-up's rule sets one, its clocks count from the ticket's creation."""
    import yaml

    from mailgw.filters.loader import load_pipeline
    from mailgw.process import Context
    from tests.helpers import Harness, mail

    home.update_config(slas=[{"name": "urgent", "first_response": 30, "solution": 600,
                              "applies_to": {"priorities": [1]}}])
    (home.path / "filters" / "50-urgent.yaml").write_text(yaml.safe_dump({"rules": [
        {"name": "urgent", "when": {"subject": {"regex": "(?i)urgent"}},
         "then": {"sla": "urgent"}}]}))
    h = Harness(home)
    pipeline = load_pipeline(home.path / "filters", h.settings, home.path / "templates")
    h.worker.context = lambda: Context(h.settings, h.renderer, pipeline)
    try:
        h.put(mail("Printer broken", msgid="first@customer.test"))
        h.drain()
        [t] = h.tickets()
        assert t.sla is None
        h.put(mail("Re: Printer broken - URGENT now", msgid="second@customer.test",
                   In_Reply_To="<first@customer.test>"))
        h.drain()
        [t] = h.tickets()
        assert (t.sla, t.sla_reason) == ("urgent", "rule urgent")
        with Session(h.engine) as s:
            cs = clocks(s, t)
            assert sorted(cs) == ["first_response", "solution"]
            for c in cs.values():
                assert utc(c.started_at) == utc(t.created_at)
                assert c.state == "running"
            fr = cs["first_response"]
            assert utc(fr.due_at) == utc(t.created_at) + timedelta(minutes=30)
    finally:
        h.close()


def test_an_sla_chosen_while_closed_starts_at_the_reopen(engine, late):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, late, FRI_1755)
        record_state(s, late, t, "closed", berlin(2026, 11, 30, 9, 0))
        to_priority_1(s, late, t, berlin(2026, 11, 30, 10, 0))
        assert t.sla == "vip" and clocks(s, t) == {}
        # an agent reopens it (no customer message): the solution clock counts from
        # creation, the closed span not counted; nothing waits for an answer
        record_state(s, late, t, "open", berlin(2026, 12, 1, 9, 0), "agent bob: #open")
        cs = clocks(s, t)
        assert sorted(cs) == ["solution"]
        assert cs["solution"].used_seconds == 5 * MIN
        assert [x.kind for x in segments(s, cs["solution"])] == ["running", "paused", "running"]


def test_mailgw_tickets_state_moves_the_clocks(home):
    """``mailgw tickets state`` records the change and tells the SLA clocks (they pause,
    resume, stop), as agent commands and the worker do."""
    home.update_config(slas=[{"name": "std", "first_response": 60, "solution": 600}])
    st = home.settings()
    engine = home.engine()
    try:
        with Session(engine) as s, s.begin():
            t = open_ticket(s, st, datetime.now(base.UTC) - timedelta(minutes=10))
            number = t.number
        home.cli("tickets", "state", number, "pending", check=True)
        with Session(engine) as s:
            t = s.scalars(select(m.Ticket).where(m.Ticket.number == number)).one()
            assert {c.state for c in clocks(s, t).values()} == {"paused"}
        home.cli("tickets", "state", number, "closed", check=True)
        with Session(engine) as s:
            t = s.scalars(select(m.Ticket).where(m.Ticket.number == number)).one()
            assert {(c.state, c.outcome) for c in clocks(s, t).values()} == {("stopped", "met")}
    finally:
        engine.dispose()
