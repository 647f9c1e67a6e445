"""SLA selection, clocks and ledger (mailgw/sla), on SQLite and PostgreSQL.

Tickets and articles are written as the worker and the agent-mail work do, then
``mailgw.ticket_events`` is called with chosen instants, so every due time is known by hand:
calendar office is Europe/Berlin, Mon-Fri 09:00-18:00 (CET = UTC+1 in Nov/Dec 2026).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgw import ticket_events
from mailgw.calendar import ALWAYS
from mailgw.settings import Settings
from mailgw.sla.clocks import calendar_for, cancel_clocks, schedule
from mailgw.sla.explain import explain_ticket, render_text
from mailgw.store import models as m
from mailgw.store.db import make_engine, migrate, read_session

BERLIN = ZoneInfo("Europe/Berlin")
WEEK = ("mon", "tue", "wed", "thu", "fri")
MIN = 60


def berlin(*args: int) -> datetime:
    return datetime(*args, tzinfo=BERLIN).astimezone(UTC)


CONFIG = {
    "queues": [{"name": "support", "addresses": ["support@example.com"]},
               {"name": "sales", "addresses": ["sales@example.com"]}],
    "agents": [{"name": "bob", "addresses": ["bob@example.com"], "queues": ["support"]}],
    "calendars": [{"name": "office", "timezone": "Europe/Berlin",
                   **{d: ["09:00-18:00"] for d in WEEK}}],
    "slas": [
        {"name": "vip", "calendar": "office", "first_response": 30, "update": 60,
         "solution": 480, "applies_to": {"priorities": [1]}},
        {"name": "standard", "calendar": "office", "first_response": 60, "update": 120,
         "solution": 960, "applies_to": {"queues": ["support"]},
         "levels": [{"percent": 75}, {"percent": 100}, {"percent": 150}]},
        {"name": "sales-24x7", "first_response": 240, "applies_to": {"queues": ["sales"]}},
    ],
}


@pytest.fixture
def settings() -> Settings:
    return Settings.model_validate(CONFIG)


@pytest.fixture
def engine(store_url: str, tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    (tmp_path / "store").mkdir(exist_ok=True)
    eng = make_engine(store_url)
    migrate(eng)
    yield eng
    eng.dispose()


def article(s: Session, t: m.Ticket, at: datetime, *, direction: str = "in",
            sender_type: str = "customer", sender: str = "alice@customer.test",
            automatic: bool = False, internal: bool = False) -> m.Article:
    a = m.Article(ticket_id=t.id, direction=direction, sender_type=sender_type,
                  from_addr=sender, threaded_by="test", created_at=at, is_automatic=automatic)
    if internal:
        a.internal = True  # type: ignore[attr-defined] # Article.internal comes with 0006
    s.add(a)
    s.flush()
    return a


def open_ticket(s: Session, st: Settings, at: datetime, *, queue: str = "support",
                priority: int = 3, state: str = "new") -> m.Ticket:
    t = m.Ticket(title="Printer on fire", queue=queue, state=state, priority=priority,
                 customer="alice@customer.test", created_at=at, updated_at=at)
    s.add(t)
    s.flush()
    t.number = f"2026112710{t.id:06d}"
    a = article(s, t, at)
    ticket_events.article_added(s, st, t, a, new_ticket=True, at=at)
    return t


def customer_says(s: Session, st: Settings, t: m.Ticket, at: datetime, **kw) -> None:  # type: ignore[no-untyped-def]
    if t.state in ("closed", "pending"):
        t.state = "open"  # as the worker does for a customer's follow-up
    a = article(s, t, at, **kw)
    ticket_events.article_added(s, st, t, a, new_ticket=False, at=at)


def agent_answers(s: Session, st: Settings, t: m.Ticket, at: datetime, **kw) -> None:  # type: ignore[no-untyped-def]
    kw.setdefault("sender", "bob@example.com")
    a = article(s, t, at, direction="out", sender_type="agent", **kw)
    ticket_events.article_added(s, st, t, a, new_ticket=False, at=at)


def set_state(s: Session, st: Settings, t: m.Ticket, new: str, at: datetime) -> None:
    old, t.state = t.state, new
    ticket_events.ticket_changed(s, st, t, {"state": (old, new)}, at=at, reason="agent bob")


def clocks(s: Session, t: m.Ticket) -> dict[str, m.SlaClock]:
    """The ticket's clocks by target (update: ``update#CYCLE``)."""
    out = {}
    for c in s.scalars(select(m.SlaClock).where(m.SlaClock.ticket_id == t.id)
                       .order_by(m.SlaClock.id)):
        out[c.target if c.target != "update" else f"update#{c.cycle}"] = c
    return out


def segments(s: Session, c: m.SlaClock) -> list[m.SlaSegment]:
    return list(s.scalars(select(m.SlaSegment).where(m.SlaSegment.clock_id == c.id)
                          .order_by(m.SlaSegment.id)))


def utc(dt: datetime | None) -> datetime | None:
    return None if dt is None else dt if dt.tzinfo else dt.replace(tzinfo=UTC)


FRI_1755 = berlin(2026, 11, 27, 17, 55)


def test_friday_evening_ticket_is_due_monday(engine, settings):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, settings, FRI_1755)
        number = t.number
    # a new session: the values come back from the store (naive on SQLite)
    with Session(engine) as s:
        t = s.scalars(select(m.Ticket).where(m.Ticket.number == number)).one()
        assert (t.sla, t.sla_reason) == ("standard", "slas[1] standard: queue support")
        cs = clocks(s, t)
        assert sorted(cs) == ["first_response", "solution"]
        fr = cs["first_response"]
        # 5 min Friday (17:55-18:00) + 55 min Monday
        assert utc(fr.due_at) == berlin(2026, 11, 30, 9, 55)
        assert (fr.state, fr.goal_minutes, fr.calendar, fr.used_seconds) == (
            "running", 60, "office", 0)
        # first level 75% = 45 min: 5 Friday + 40 Monday
        assert utc(fr.next_notice_at) == berlin(2026, 11, 30, 9, 40)
        # solution: 960 min = 16 h: 5 min Fri, 9 h Mon, 6 h 55 min Tue
        assert utc(cs["solution"].due_at) == berlin(2026, 12, 1, 15, 55)
        [seg] = segments(s, fr)
        assert (seg.kind, seg.end_at, seg.counted_seconds) == ("running", None, None)
        assert "alice@customer.test" in seg.reason


def test_agent_answer_stops_first_response_system_mail_and_notes_do_not(engine, settings):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, settings, FRI_1755)
        # the acknowledgement and an internal note stop nothing
        a = article(s, t, FRI_1755, direction="out", sender_type="system",
                    sender="support@example.com")
        ticket_events.article_added(s, settings, t, a, new_ticket=False, at=FRI_1755)
        agent_answers(s, settings, t, berlin(2026, 11, 30, 9, 0), internal=True)
        assert clocks(s, t)["first_response"].state == "running"
        agent_answers(s, settings, t, berlin(2026, 11, 30, 9, 50))
        fr = clocks(s, t)["first_response"]
        assert (fr.state, fr.outcome) == ("stopped", "met")
        assert fr.used_seconds == 55 * MIN  # 5 Friday + 50 Monday
        assert utc(fr.stopped_at) == berlin(2026, 11, 30, 9, 50)
        assert fr.due_at is None and fr.next_notice_at is None and fr.breached_at is None
        run, stop = segments(s, fr)
        assert (run.counted_seconds, utc(run.end_at)) == (55 * MIN, berlin(2026, 11, 30, 9, 50))
        assert stop.kind == "stopped" and stop.reason == "answer by bob@example.com: met"
        # the solution clock runs on
        assert clocks(s, t)["solution"].state == "running"


def test_a_late_answer_is_a_breach_at_the_due_time(engine, settings):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, settings, FRI_1755)
        agent_answers(s, settings, t, berlin(2026, 11, 30, 11, 0))
        fr = clocks(s, t)["first_response"]
        assert fr.outcome == "breached"
        assert utc(fr.breached_at) == berlin(2026, 11, 30, 9, 55)
        assert fr.used_seconds == 5 * MIN + 2 * 60 * MIN


def test_pending_pauses_and_leaving_it_resumes(engine, settings):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, settings, FRI_1755)
        set_state(s, settings, t, "pending", berlin(2026, 11, 30, 9, 10))
        for c in clocks(s, t).values():
            assert c.state == "paused"
            assert c.due_at is None and c.next_notice_at is None and c.running_since is None
            assert c.used_seconds == 15 * MIN  # 5 Friday + 10 Monday
        fr = clocks(s, t)["first_response"]
        run, paused = segments(s, fr)
        assert run.counted_seconds == 15 * MIN
        assert (paused.kind, paused.end_at) == ("paused", None)
        assert paused.reason == "state pending (agent bob)"
        # back to open the next day at 10:00: 45 min left
        set_state(s, settings, t, "open", berlin(2026, 12, 1, 10, 0))
        fr = clocks(s, t)["first_response"]
        assert fr.state == "running"
        assert utc(fr.due_at) == berlin(2026, 12, 1, 10, 45)
        assert utc(fr.next_notice_at) == berlin(2026, 12, 1, 10, 30)  # 75%: 45 of 60 min
        kinds = [(x.kind, x.counted_seconds) for x in segments(s, fr)]
        assert kinds == [("running", 15 * MIN), ("paused", 0), ("running", None)]


def test_a_customer_reply_to_a_pending_ticket_resumes_it(engine, settings):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, settings, FRI_1755)
        agent_answers(s, settings, t, berlin(2026, 11, 30, 9, 30))
        set_state(s, settings, t, "pending", berlin(2026, 11, 30, 9, 31))
        customer_says(s, settings, t, berlin(2026, 11, 30, 14, 0))
        cs = clocks(s, t)
        assert cs["solution"].state == "running"
        assert cs["update#1"].state == "running"
        assert utc(cs["update#1"].due_at) == berlin(2026, 11, 30, 16, 0)  # 120 min


def test_follow_ups_and_the_update_clock(engine, settings):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, settings, FRI_1755)
        # a follow-up before the first answer: the first-response clock covers it
        customer_says(s, settings, t, berlin(2026, 11, 30, 9, 5))
        assert "update#1" not in clocks(s, t)
        agent_answers(s, settings, t, berlin(2026, 11, 30, 9, 30))
        customer_says(s, settings, t, berlin(2026, 11, 30, 10, 0))
        u1 = clocks(s, t)["update#1"]
        assert utc(u1.due_at) == berlin(2026, 11, 30, 12, 0)
        # an out-of-office reply is automatic: no update clock of its own
        customer_says(s, settings, t, berlin(2026, 11, 30, 10, 30), automatic=True)
        # a second message while one is unanswered: the oldest counts
        customer_says(s, settings, t, berlin(2026, 11, 30, 11, 0))
        cs = clocks(s, t)
        assert [k for k in cs if k.startswith("update")] == ["update#1"]
        assert utc(cs["update#1"].started_at) == berlin(2026, 11, 30, 10, 0)
        agent_answers(s, settings, t, berlin(2026, 11, 30, 11, 30))
        assert (cs["update#1"].state, cs["update#1"].outcome) == ("stopped", "met")
        assert cs["update#1"].used_seconds == 90 * MIN
        # the next message starts cycle 2
        customer_says(s, settings, t, berlin(2026, 12, 1, 9, 0))
        u2 = clocks(s, t)["update#2"]
        assert (u2.state, u2.cycle) == ("running", 2)
        assert utc(u2.due_at) == berlin(2026, 12, 1, 11, 0)


def test_close_stops_and_reopen_resumes_the_solution_clock(engine, settings):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, settings, FRI_1755)
        agent_answers(s, settings, t, berlin(2026, 11, 30, 9, 30))
        set_state(s, settings, t, "closed", berlin(2026, 11, 30, 10, 0))
        sol = clocks(s, t)["solution"]
        assert (sol.state, sol.outcome, sol.used_seconds) == ("stopped", "met", 65 * MIN)
        # the customer writes again the next day: the worker reopens the ticket
        customer_says(s, settings, t, berlin(2026, 12, 1, 9, 0))
        sol = clocks(s, t)["solution"]
        assert (sol.state, sol.outcome, sol.stopped_at) == ("running", None, None)
        assert sol.used_seconds == 65 * MIN
        # 960 - 65 = 895 min from Tue 09:00: 540 Tue, 355 Wed -> Wed 14:55
        assert utc(sol.due_at) == berlin(2026, 12, 2, 14, 55)
        reasons = [(x.kind, x.reason) for x in segments(s, sol)]
        assert reasons[-1][0] == "running" and reasons[-1][1].startswith("reopened, state open")
        assert ("stopped", "ticket closed (agent bob): met") in reasons
        # and an update clock for the new message
        assert clocks(s, t)["update#1"].state == "running"


def test_priority_change_reselects_the_sla_from_the_clocks_start(engine, settings):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, settings, FRI_1755)
        at = berlin(2026, 11, 30, 9, 10)
        t.priority = 1
        ticket_events.ticket_changed(s, settings, t, {"priority": (3, 1)}, at=at,
                                     reason="agent bob")
        assert (t.sla, t.sla_reason) == ("vip", "slas[0] vip: priority 1")
        fr = clocks(s, t)["first_response"]
        # vip: 30 business minutes from Friday 17:55: 5 Friday + 25 Monday
        assert (fr.sla, fr.goal_minutes) == ("vip", 30)
        assert utc(fr.due_at) == berlin(2026, 11, 30, 9, 25)
        assert fr.used_seconds == 15 * MIN
        run, run2 = segments(s, fr)
        assert run.counted_seconds == 15 * MIN
        assert run2.reason.startswith("SLA standard -> vip (agent bob: priority 3 -> 1")
        assert "from the clock's start" in run2.reason
        sol = clocks(s, t)["solution"]
        assert (sol.sla, sol.goal_minutes) == ("vip", 480)
        # the queue moves to sales (priority stays 1: vip still wins), then back to 3
        t.priority = 3
        t.queue = "sales"
        ticket_events.ticket_changed(s, settings, t, {"priority": (1, 3), "queue": ("support",
                                                                                    "sales")},
                                     at=berlin(2026, 11, 30, 9, 40))
        assert t.sla == "sales-24x7"
        fr = clocks(s, t)["first_response"]
        # 24x7: 240 minutes from Fri 17:55 -> Fri 21:55; counted anew in calendar time
        assert (fr.calendar, fr.goal_minutes) == (None, 240)
        assert utc(fr.breached_at) == berlin(2026, 11, 27, 21, 55)
        assert utc(fr.due_at) == berlin(2026, 11, 27, 21, 55)
        # sales-24x7 has no solution goal: that clock is cancelled
        sol = clocks(s, t)["solution"]
        assert (sol.state, sol.outcome) == ("stopped", "cancelled")


def test_a_stricter_sla_can_make_a_clock_breached_at_once(engine, settings):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, settings, FRI_1755)
        t.priority = 1
        ticket_events.ticket_changed(s, settings, t, {"priority": (3, 1)},
                                     at=berlin(2026, 11, 30, 9, 45))
        fr = clocks(s, t)["first_response"]
        # 50 min used against a goal of 30: the breach was at Mon 09:25
        assert utc(fr.breached_at) == berlin(2026, 11, 30, 9, 25)
        assert utc(fr.due_at) == berlin(2026, 11, 30, 9, 25)
        agent_answers(s, settings, t, berlin(2026, 11, 30, 9, 50))
        assert clocks(s, t)["first_response"].outcome == "breached"


def test_merged_ticket_cancels_its_clocks(engine, settings):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, settings, FRI_1755)
        set_state(s, settings, t, "merged", berlin(2026, 11, 30, 10, 0))
        for c in clocks(s, t).values():
            assert (c.state, c.outcome) == ("stopped", "cancelled")
            assert c.next_notice_at is None
        t2 = open_ticket(s, settings, FRI_1755)
        assert cancel_clocks(s, t2, "ticket deleted", settings=settings,
                             at=berlin(2026, 11, 30, 10, 0)) == 2
        fr = clocks(s, t2)["first_response"]
        assert fr.outcome == "cancelled" and fr.used_seconds == 65 * MIN  # 5 Fri + 60 Mon
        assert segments(s, fr)[-1].reason == "ticket deleted: cancelled"
        assert cancel_clocks(s, t2, "again", settings=settings) == 0


def test_a_ticket_born_pending_or_closed(engine, settings):
    """A filter rule may set the state of a new ticket: its clocks start paused, or stop."""
    with Session(engine) as s, s.begin():
        t = open_ticket(s, settings, FRI_1755, state="pending")
        for c in clocks(s, t).values():
            assert (c.state, c.due_at, c.next_notice_at) == ("paused", None, None)
            [seg] = segments(s, c)
            assert seg.kind == "paused" and seg.reason.endswith("; state pending")
        set_state(s, settings, t, "open", berlin(2026, 11, 30, 9, 0))
        assert utc(clocks(s, t)["first_response"].due_at) == berlin(2026, 11, 30, 10, 0)
        t2 = open_ticket(s, settings, FRI_1755, state="closed")
        cs = clocks(s, t2)
        assert {(c.state, c.outcome, c.used_seconds) for c in cs.values()} == {
            ("stopped", "met", 0)}


def test_no_sla_no_clocks(engine, settings):
    bare = Settings.model_validate({**CONFIG, "slas": []})
    with Session(engine) as s, s.begin():
        t = open_ticket(s, bare, FRI_1755)
        assert t.sla is None and clocks(s, t) == {}
        # a queue no SLA covers
        other = Settings.model_validate({**CONFIG, "slas": CONFIG["slas"][:1]})
        t2 = open_ticket(s, other, FRI_1755)
        assert (t2.sla, t2.sla_reason) == (None, None) and clocks(s, t2) == {}
        # ... until a priority change brings it under one: its clocks count from the
        # ticket's history (tests/test_sla_later.py)
        t2.priority = 1
        ticket_events.ticket_changed(s, other, t2, {"priority": (3, 1)},
                                     at=berlin(2026, 11, 30, 10, 0))
        assert t2.sla == "vip"
        assert utc(clocks(s, t2)["solution"].started_at) == FRI_1755
        assert utc(clocks(s, t2)["first_response"].started_at) == FRI_1755


def test_schedule_walks_the_levels(engine, settings):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, settings, FRI_1755)
        fr = clocks(s, t)["first_response"]
        sla = settings.slas[1]
        cal = calendar_for(settings, "office")
        fr.next_level = 1
        schedule(fr, sla, cal)
        assert utc(fr.next_notice_at) == utc(fr.due_at)  # 100% is the due time
        fr.next_level = 2
        schedule(fr, sla, cal)  # 150% = 90 min: 5 Fri + 85 Mon
        assert utc(fr.next_notice_at) == berlin(2026, 11, 30, 10, 25)
        fr.next_level = 3
        schedule(fr, sla, cal)
        assert fr.next_notice_at is None
    assert calendar_for(settings, None) is ALWAYS
    assert calendar_for(settings, "office") is calendar_for(settings, "office")


def test_explain_says_why_it_is_due(engine, settings):
    with Session(engine) as s, s.begin():
        t = open_ticket(s, settings, FRI_1755)
        late = open_ticket(s, settings, berlin(2026, 11, 27, 18, 30))
        now = berlin(2026, 11, 28, 12, 0)
        data = explain_ticket(s, settings, t, now=now)
        json.dumps(data)
        assert data["sla"] == "standard" and data["reason"] == "slas[1] standard: queue support"
        fr = next(c for c in data["clocks"] if c["target"] == "first_response")
        assert fr["due_at"] == "2026-11-30T09:55:00+01:00"
        assert fr["timezone"] == "Europe/Berlin"
        assert fr["ledger"][0].startswith("received Fri 2026-11-27 17:55 (ticket opened by")
        assert fr["ledger"][1:4] == ["  Fri 17:55–18:00 5 min", "  Mon 09:00–09:55 55 min",
                                     "due Mon 2026-11-30 09:55 because 60 business minutes of "
                                     "calendar office (Europe/Berlin)"]
        text = "\n".join(render_text(data))
        assert "first_response [running] due Mon 2026-11-30 09:55" in text
        late_fr = next(c for c in explain_ticket(s, settings, late, now=now)["clocks"]
                       if c["target"] == "first_response")
        assert ("outside working hours, counting starts Mon 2026-11-30 09:00"
                in late_fr["ledger"][0])
        assert late_fr["summary"].startswith("due Mon 2026-11-30 10:00")
        # paused and stopped read as such
        set_state(s, settings, t, "pending", berlin(2026, 11, 30, 9, 10))
        set_state(s, settings, t, "open", berlin(2026, 11, 30, 14, 0))
        agent_answers(s, settings, t, berlin(2026, 11, 30, 15, 0))
        fr = next(c for c in explain_ticket(s, settings, t, now=now)["clocks"]
                  if c["target"] == "first_response")
        ledger = "\n".join(fr["ledger"])
        assert "Mon 2026-11-30 09:10 – Mon 2026-11-30 14:00 paused: state pending" in ledger
        assert "Mon 14:00–15:00 1 h" in ledger
        assert "stopped: answer by bob@example.com: breached" in ledger
        assert fr["summary"].startswith("breached Mon 2026-11-30 15:00: 1 h 15 min used")
        assert "due was Mon 2026-11-30 14:45" in fr["summary"]


def test_settings_refuse_bad_sla_config():
    def bad(**sla) -> str:  # type: ignore[no-untyped-def]
        with pytest.raises(ValidationError) as exc:
            Settings.model_validate({**CONFIG, "slas": [{"name": "x", "first_response": 60,
                                                          **sla}]})
        return str(exc.value)

    assert "unknown calendar 'nope'" in bad(calendar="nope")
    assert "unknown queue 'nope'" in bad(applies_to={"queues": ["nope"]})
    assert "'closed' is not a state" in bad(pause_states=["closed"])
    assert "assign: unknown agent 'carol'" in bad(levels=[{"percent": 100,
                                                           "actions": {"assign": "carol"}}])
    assert "at least one of" in bad(first_response=None)
    with pytest.raises(ValidationError, match="calendar 'closed' has no working hours"):
        Settings.model_validate({**CONFIG, "calendars": [{"name": "closed"}], "slas": [
            {"name": "x", "calendar": "closed", "first_response": 60}]})
    ok = Settings.model_validate({**CONFIG, "slas": [{"name": "x", "update": 5, "levels": [
        {"percent": 100, "actions": {"assign": "queue"}}]}]})
    assert ok.slas[0].levels[0].actions.assign == "queue"


# -- through the worker, the filters and the CLI ------------------------------------------

@pytest.fixture
def sla_home(home):  # type: ignore[no-untyped-def]
    cfg = home.config()
    cfg["calendars"] = CONFIG["calendars"]
    cfg["slas"] = [
        {"name": "vip", "calendar": "office", "first_response": 30, "solution": 480,
         "applies_to": {"priorities": [1]}},
        {"name": "standard", "first_response": 60, "update": 120, "solution": 960},
    ]
    home.write_config(cfg)
    (home.path / "filters" / "50-sla.yaml").write_text(yaml.safe_dump({"rules": [
        {"name": "vip", "when": {"sender_domain": "bigcorp.test"}, "then": {"sla": "vip"}},
    ]}))
    return home


def test_worker_opens_clocks_and_a_rule_chooses_the_sla(sla_home):
    from mailgw.filters.loader import load_pipeline
    from mailgw.process import Context
    from tests.helpers import Harness, mail

    h = Harness(sla_home)
    pipeline = load_pipeline(sla_home.path / "filters", h.settings, sla_home.path / "templates")
    h.worker.context = lambda: Context(h.settings, h.renderer, pipeline)
    try:
        h.put(mail("A question about an invoice", sender="alice@customer.test"),
              mail("Another question", sender="ceo@bigcorp.test"))
        h.drain()
        t1, t2 = h.tickets()
        assert (t1.sla, t1.sla_reason) == ("standard", "slas[1] standard: applies to every ticket")
        assert (t2.sla, t2.sla_reason) == ("vip", "rule vip")
        with read_session(h.engine) as s:
            c1, c2 = clocks(s, t1), clocks(s, t2)
            assert sorted(c1) == ["first_response", "solution"]
            assert (c2["first_response"].sla, c2["first_response"].goal_minutes) == ("vip", 30)
            assert c2["first_response"].calendar == "office"
            # 24x7: due exactly an hour after creation
            fr = c1["first_response"]
            assert utc(fr.due_at) - utc(fr.started_at) == timedelta(minutes=60)
            # the acknowledgement went out and stopped nothing
            assert fr.state == "running"
        assert len(h.outbox()) == 2
    finally:
        h.close()
    out = sla_home.cli("explain", t2.number, "--json", check=True).stdout
    data = json.loads(out)
    assert data["sla"]["sla"] == "vip" and data["sla"]["reason"] == "rule vip"
    assert {c["target"] for c in data["sla"]["clocks"]} == {"first_response", "solution"}
    text = sla_home.cli("explain", t2.number, check=True).stdout.decode()
    assert "SLA: vip (rule vip)" in text
    assert "because 30 business minutes of calendar office (Europe/Berlin)" in text


def test_filter_sla_action_is_checked_and_in_the_schema(sla_home):
    schema = json.loads(sla_home.cli("filters", "schema", check=True).stdout)
    assert "sla" in schema["$defs"]["Actions"]["properties"]
    (sla_home.path / "filters" / "60-bad.yaml").write_text(yaml.safe_dump({"rules": [
        {"name": "typo", "then": {"sla": "vipp"}}]}))
    proc = sla_home.cli("filters", "check")
    assert proc.returncode != 0
    err = (proc.stdout + proc.stderr).decode()
    assert "60-bad.yaml" in err and "unknown SLA 'vipp'" in err


def test_the_commented_example_in_the_shipped_config_is_valid():
    text = (Path(__file__).parents[1] / "config" / "mailgw.yaml").read_text()
    lines = text.splitlines()

    def block(key: str):  # type: ignore[no-untyped-def]
        start = next(i for i, line in enumerate(lines) if line.startswith(f"# {key}:"))
        out = [lines[start][2:]]
        for line in lines[start + 1:]:
            if not line.startswith("#  "):
                break
            out.append(line[2:])
        return yaml.safe_load("\n".join(out))[key]

    shipped = yaml.safe_load(text)
    settings = Settings.model_validate({**shipped, "calendars": block("calendars"),
                                        "slas": block("slas")})
    assert [s.name for s in settings.slas] == ["vip", "standard"]
    assert settings.slas[0].levels[1].actions.priority == "raise"
