"""The escalation sweep (mailgw/sla/sweep.py): each SLA warning and breach fires exactly once,
in order, at working hours if asked, with its mail and its actions; also with two sweepers at
once and after a crash inside the transaction. SlaClock rows are made here directly (the
clock engine is another module's job), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from email import message_from_bytes

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailgw import ticket_events
from mailgw.outbound.render import Renderer
from mailgw.sla import sweep as sweep_mod
from mailgw.sla.sweep import Sweeper
from mailgw.store import models as m
from mailgw.store.db import make_engine
from tests.conftest import wait_until

T0 = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)  # a Wednesday
MIN = timedelta(minutes=1)

AGENTS = [
    {"name": "alice", "addresses": ["alice@example.com"], "queues": ["support"]},
    {"name": "bob", "addresses": ["bob@example.com"], "queues": ["billing"]},
    {"name": "carol", "addresses": ["carol@example.com"], "queues": ["support"]},
]
OFFICE = {"name": "office", "timezone": "UTC", "mon": ["09:00-17:00"], "tue": ["09:00-17:00"],
          "wed": ["09:00-17:00"], "thu": ["09:00-17:00"], "fri": ["09:00-17:00"]}


def configure(home, slas: list[dict], **extra) -> None:  # type: ignore[no-untyped-def]
    home.update_config(agents=AGENTS, calendars=[OFFICE], slas=slas, **extra)


def std(levels: list[dict] | None = None, **kw) -> dict:  # type: ignore[no-untyped-def]
    sla = {"name": "std", "first_response": 60, **kw}
    if levels is not None:
        sla["levels"] = levels
    return sla


def aware(dt: datetime | None) -> datetime | None:
    return dt if dt is None or dt.tzinfo else dt.replace(tzinfo=UTC)


def add_ticket(s: Session, n: int = 1, *, owner: str | None = "alice", queue: str = "support",
               priority: int = 3) -> m.Ticket:
    t = m.Ticket(number=f"20261125100{n:05d}", title=f"Printer {n} on fire", queue=queue,
                 state="open", priority=priority, customer=f"c{n}@customer.test", owner=owner,
                 created_at=T0, updated_at=T0, tags=["printer"], custom_fields={}, sla="std")
    s.add(t)
    s.flush()
    s.add(m.Article(ticket_id=t.id, direction="in", sender_type="customer",
                    from_addr=t.customer, subject=t.title, message_id=f"first-{n}@customer.test",
                    threaded_by="new_ticket", created_at=T0))
    return t


def add_clock(s: Session, ticket: m.Ticket, *, goal: int = 60, first_percent: int = 75,
              state: str = "running", calendar: str | None = None, used: int = 0,
              since: datetime = T0) -> m.SlaClock:
    """A running first-response clock started at ``since``; next_notice_at at the first
    level (24x7 arithmetic: the tests pick times where that is the truth)."""
    c = m.SlaClock(ticket_id=ticket.id, sla="std", target="first_response", cycle=0,
                   calendar=calendar, goal_minutes=goal, state=state, started_at=since,
                   used_seconds=used, running_since=since if state == "running" else None,
                   due_at=since + goal * MIN - timedelta(seconds=used), next_level=0,
                   next_notice_at=since + goal * MIN * first_percent / 100)
    s.add(c)
    s.flush()
    return c


class Env:
    def __init__(self, home):  # type: ignore[no-untyped-def]
        self.home = home
        self.engine = home.engine()
        self.settings = home.settings()
        self.renderer = Renderer(home.path / "templates")

    def sweeper(self, **kw) -> Sweeper:  # type: ignore[no-untyped-def]
        return Sweeper(self.engine, self.settings, self.renderer, **kw)

    def count(self, model) -> int:  # type: ignore[no-untyped-def]
        with Session(self.engine) as s:
            return s.scalar(select(func.count()).select_from(model))

    def all(self, model, *order):  # type: ignore[no-untyped-def]
        with Session(self.engine) as s:
            return list(s.scalars(select(model).order_by(*(order or (model.id,)))))


@pytest.fixture
def env(home):  # type: ignore[no-untyped-def]
    e = None

    def make(slas: list[dict], **extra) -> Env:  # type: ignore[no-untyped-def]
        nonlocal e
        configure(home, slas, **extra)
        e = Env(home)
        return e

    yield make
    if e is not None:
        e.engine.dispose()


def test_a_due_warning_fires_once_and_mails_the_owner(env):  # type: ignore[no-untyped-def]
    # Given a 60-minute first-response clock at 50 minutes (75 % came at 45)
    e = env([std()])
    with Session(e.engine) as s, s.begin():
        t = add_ticket(s)
        c = add_clock(s, t)
        ticket_id, clock_id = t.id, c.id
    # When the sweep runs, twice
    first = e.sweeper().sweep(T0 + 50 * MIN)
    second = e.sweeper().sweep(T0 + 50 * MIN)
    # Then the warning fired once, to alice, and the clock waits for the breach
    assert [(f.kind, f.percent, f.recipients) for f in first.fired] == [
        ("warning", 75, ["alice@example.com"])]
    assert second.fired == [] and second.batches == 0
    [notice] = e.all(m.SlaNotice)
    assert (notice.clock_id, notice.level, notice.kind) == (clock_id, 0, "warning")
    assert notice.actions["recipients"] == ["alice@example.com"]
    [clock] = e.all(m.SlaClock)
    assert clock.next_level == 1 and aware(clock.next_notice_at) == T0 + 60 * MIN
    assert clock.breached_at is None
    [out] = e.all(m.Outbox)
    assert out.rcpt_tos == ["alice@example.com"] and out.ticket_id == ticket_id
    assert out.mail_from.startswith("bounces+") and out.mail_from.endswith("@example.com")
    mail = message_from_bytes(out.raw)
    assert mail["Auto-Submitted"] == "auto-generated"
    assert mail["From"].endswith("<support@example.com>")
    assert mail["In-Reply-To"] == "<first-1@customer.test>"
    assert mail["References"] == "<first-1@customer.test>"
    assert "[Ticket#2026112510000001]" in mail["Subject"] and "SLA warning" in mail["Subject"]
    body = mail.get_payload(decode=True).decode()
    assert "75% of its first response time" in body and "SLA std" in body
    # the loop-protection counters are the customers'; agents' notices do not count there
    assert e.count(m.AutoReply) == 0
    events = [ev for ev in e.all(m.Event) if ev.type.startswith("sla_")]
    assert [ev.type for ev in events] == ["sla_warning"]
    assert events[0].data["percent"] == 75


def test_levels_fire_in_order_and_the_breach_is_recorded_at_its_real_time(env):  # type: ignore[no-untyped-def]
    e = env([std(levels=[{"percent": 50}, {"percent": 75}, {"percent": 100},
                         {"percent": 150, "notify": ["queue_agents", "boss@example.com"]}])])
    with Session(e.engine) as s, s.begin():
        add_clock(s, add_ticket(s), first_percent=50)
    # Swept long after all four levels (the gateway was down)
    result = e.sweeper().sweep(T0 + 100 * MIN)
    assert [(f.level, f.kind) for f in result.fired] == [
        (0, "warning"), (1, "warning"), (2, "breach"), (3, "breach")]
    assert result.fired[3].recipients == ["alice@example.com", "carol@example.com",
                                          "boss@example.com"]
    notices = e.all(m.SlaNotice)
    assert [n.level for n in sorted(notices, key=lambda n: n.id)] == [0, 1, 2, 3]
    [clock] = e.all(m.SlaClock)
    assert aware(clock.breached_at) == T0 + 60 * MIN  # the due time, not the sweep's
    assert clock.next_level == 4 and clock.next_notice_at is None
    assert len(e.all(m.Outbox)) == 4
    subjects = [message_from_bytes(o.raw)["Subject"] for o in e.all(m.Outbox)]
    assert "SLA BREACHED" in subjects[2] and "150%" in subjects[3]
    assert e.sweeper().sweep(T0 + 200 * MIN).fired == []


def test_breach_actions_raise_priority_reassign_and_tag(env, home, monkeypatch):  # type: ignore[no-untyped-def]
    calls = []
    monkeypatch.setattr(ticket_events, "ticket_changed",
                        lambda session, settings, ticket, changes, *, at, reason="":
                        calls.append((ticket.id, changes, reason)))
    # support assigns by least open among carol only (for the "queue" action)
    queues = home.config()["queues"]
    queues[0]["assignment"] = {"strategy": "least_open", "agents": ["carol"]}
    e = env([std(levels=[
        {"percent": 100, "actions": {"priority": "raise", "assign": "bob", "tags": ["escalated"]}},
        {"percent": 200, "actions": {"priority": 1, "assign": "queue", "tags": ["escalated"]}},
    ])], queues=queues)
    with Session(e.engine) as s, s.begin():
        t = add_ticket(s, priority=3)
        add_clock(s, t, first_percent=100)
        ticket_id = t.id
    result = e.sweeper().sweep(T0 + 61 * MIN)
    [fired] = result.fired
    assert fired.kind == "breach"
    assert fired.changes == {"priority": [3, 2], "owner": ["alice", "bob"],
                             "tags": [["printer"], ["printer", "escalated"]]}
    [t] = e.all(m.Ticket)
    assert (t.priority, t.owner, t.tags) == (2, "bob", ["printer", "escalated"])
    # the notice goes to the owner at the time of sending: bob, just assigned
    assert e.all(m.Outbox)[0].rcpt_tos == ["bob@example.com"]
    [notice] = e.all(m.SlaNotice)
    assert notice.actions["changes"]["owner"] == ["alice", "bob"]
    [ev] = [ev for ev in e.all(m.Event) if ev.type == "sla_breach"]
    assert ev.data["changes"]["priority"] == [3, 2] and ev.data["percent"] == 100
    assert calls == [(ticket_id, {"priority": (3, 2), "owner": ("alice", "bob"),
                                  "tags": (["printer"], ["printer", "escalated"])},
                      "SLA std first_response breach at 100%")]
    [clock] = e.all(m.SlaClock)
    assert aware(clock.breached_at) == T0 + 60 * MIN
    # The second level: priority 1, the queue's assignment, and the tag it already has is
    # not added twice
    result = e.sweeper().sweep(T0 + 121 * MIN)
    assert [f.changes for f in result.fired] == [{"priority": [2, 1], "owner": ["bob", "carol"]}]
    [t] = e.all(m.Ticket)
    assert (t.priority, t.owner, t.tags) == (1, "carol", ["printer", "escalated"])


def test_paused_and_stopped_clocks_do_not_fire(env):  # type: ignore[no-untyped-def]
    e = env([std()])
    with Session(e.engine) as s, s.begin():
        add_clock(s, add_ticket(s, 1), state="paused")
        stopped = add_clock(s, add_ticket(s, 2), state="stopped")
        stopped.running_since = None
        add_clock(s, add_ticket(s, 3))
    result = e.sweeper().sweep(T0 + 50 * MIN)
    assert [f.ticket for f in result.fired] == ["2026112510000003"]
    assert sorted(x["why"] for x in result.skipped) == ["the clock is paused",
                                                       "the clock is stopped"]
    by_ticket = {c.ticket_id: c for c in e.all(m.SlaClock)}
    assert [by_ticket[i].next_notice_at is None for i in sorted(by_ticket)] == [True, True, False]
    assert e.count(m.SlaNotice) == 1 and e.count(m.Outbox) == 1


def test_a_notice_without_recipient_is_recorded_not_sent(env):  # type: ignore[no-untyped-def]
    e = env([std()])
    with Session(e.engine) as s, s.begin():
        add_clock(s, add_ticket(s, owner=None))
    [fired] = e.sweeper().sweep(T0 + 50 * MIN).fired
    assert fired.recipients == []
    assert e.count(m.Outbox) == 0 and e.count(m.SlaNotice) == 1
    [ev] = [ev for ev in e.all(m.Event) if ev.type == "sla_notice_unaddressed"]
    assert ev.data["why"] == ["owner: the ticket has no owner"]
    assert e.sweeper().sweep(T0 + 55 * MIN).fired == []  # still once


def test_a_clock_that_changed_since_it_was_scheduled_is_rescheduled(env):  # type: ignore[no-untyped-def]
    e = env([std()])
    with Session(e.engine) as s, s.begin():
        c = add_clock(s, add_ticket(s))
        c.running_since = T0 + 30 * MIN  # resumed later than next_notice_at assumed
    result = e.sweeper().sweep(T0 + 50 * MIN)
    assert result.fired == [] and "not reached" in result.skipped[0]["why"]
    [clock] = e.all(m.SlaClock)
    assert aware(clock.next_notice_at) == T0 + 75 * MIN


def test_outside_working_hours_the_notice_waits_and_the_breach_time_does_not(env):  # type: ignore[no-untyped-def]
    # A 24x7 clock (calendar minutes) of an SLA whose notices keep office hours (Mon-Fri
    # 09-17 UTC): started Friday 16:30, 50 % at 17:00, breached 17:30.
    fri = datetime(2026, 11, 27, 16, 30, tzinfo=UTC)
    e = env([std(calendar="office", levels=[{"percent": 50}, {"percent": 100}])])
    with Session(e.engine) as s, s.begin():
        add_clock(s, add_ticket(s), since=fri, first_percent=50)
    # Friday 17:10: reached, outside hours: deferred, breach not yet due
    r1 = e.sweeper().sweep(fri + 40 * MIN)
    assert r1.fired == [] and r1.deferred[0]["until"] == "2026-11-30T09:00:00+00:00"
    [clock] = e.all(m.SlaClock)
    assert clock.next_level == 0 and clock.breached_at is None
    assert aware(clock.next_notice_at) == fri + 60 * MIN  # wakes for the breach bookkeeping
    # Friday 17:35: the breach is recorded at its real time; still no mail
    r2 = e.sweeper().sweep(fri + 65 * MIN)
    assert r2.fired == []
    [clock] = e.all(m.SlaClock)
    assert aware(clock.breached_at) == fri + 60 * MIN
    assert aware(clock.next_notice_at) == datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
    # Saturday: nothing is even claimed
    assert e.sweeper().sweep(datetime(2026, 11, 28, 12, 0, tzinfo=UTC)).batches == 0
    assert e.count(m.Outbox) == 0
    # Monday 09:00:30: both fire, in order, saying when they were really reached
    mon = datetime(2026, 11, 30, 9, 0, 30, tzinfo=UTC)
    r3 = e.sweeper().sweep(mon)
    assert [(f.kind, f.reached_at) for f in r3.fired] == [
        ("warning", "2026-11-27T17:00:00+00:00"), ("breach", "2026-11-27T17:30:00+00:00")]
    body = message_from_bytes(e.all(m.Outbox)[0].raw).get_payload(decode=True).decode()
    assert "2026-11-27 17:00 UTC (this notice waited until 2026-11-30 09:00 UTC)" in body
    [clock] = e.all(m.SlaClock)
    assert aware(clock.breached_at) == fri + 60 * MIN


def _many(e: Env, count: int) -> None:
    with Session(e.engine) as s, s.begin():
        for i in range(count):
            add_clock(s, add_ticket(s, i + 1), first_percent=75)


def test_two_concurrent_sweepers_fire_each_notice_exactly_once(env, store_url):  # type: ignore[no-untyped-def]
    # 200 clocks with both levels due, two sweepers each with its own engine, small batches
    # so they interleave (PostgreSQL: SKIP LOCKED; SQLite: one writer at a time).
    e = env([std()])
    _many(e, 200)
    at = T0 + 70 * MIN
    results, errors = [], []
    start = threading.Barrier(2)

    def run() -> None:
        engine = make_engine(store_url)
        try:
            start.wait()
            results.append(Sweeper(engine, e.settings, e.renderer, batch_size=7).sweep(at))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    fired = [(f.clock_id, f.level) for r in results for f in r.fired]
    if store_url.startswith("postgresql"):
        # SKIP LOCKED: they shared the work instead of one waiting for the other
        assert all(r.fired for r in results), [len(r.fired) for r in results]
    assert len(fired) == 400 and len(set(fired)) == 400
    assert e.count(m.SlaNotice) == 400 and e.count(m.Outbox) == 400
    assert all(c.next_level == 2 and c.breached_at is not None for c in e.all(m.SlaClock))


def test_a_crash_inside_the_transaction_loses_nothing_and_doubles_nothing(env, monkeypatch):  # type: ignore[no-untyped-def]
    e = env([std()])
    _many(e, 30)
    real = sweep_mod.prepare
    calls = {"n": 0}

    def crash_on_the_12th(*a, **kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 12:
            raise RuntimeError("killed between claim and commit")
        return real(*a, **kw)

    monkeypatch.setattr(sweep_mod, "prepare", crash_on_the_12th)
    with pytest.raises(RuntimeError):
        e.sweeper(batch_size=10).sweep(T0 + 50 * MIN)
    # The first batch (10) committed; the second rolled back whole
    assert e.count(m.SlaNotice) == 10 and e.count(m.Outbox) == 10
    assert sorted(c.next_level for c in e.all(m.SlaClock)) == [0] * 20 + [1] * 10
    # A restarted sweeper (new engine) finishes the rest, once
    monkeypatch.setattr(sweep_mod, "prepare", real)
    e.engine.dispose()
    e.engine = e.home.engine()
    result = e.sweeper(batch_size=10).sweep(T0 + 50 * MIN)
    assert len(result.fired) == 20
    assert e.count(m.SlaNotice) == 30 and e.count(m.Outbox) == 30
    assert len({(n.clock_id, n.level) for n in e.all(m.SlaNotice)}) == 30


def test_the_guard_row_stops_a_second_notice_even_if_the_clock_is_rewound(env):  # type: ignore[no-untyped-def]
    e = env([std()])
    with Session(e.engine) as s, s.begin():
        add_clock(s, add_ticket(s))
    assert len(e.sweeper().sweep(T0 + 50 * MIN).fired) == 1
    with Session(e.engine) as s, s.begin():
        c = s.scalars(select(m.SlaClock)).one()
        c.next_level, c.next_notice_at = 0, T0 + 45 * MIN
    assert e.sweeper().sweep(T0 + 50 * MIN).fired == []
    assert e.count(m.SlaNotice) == 1 and e.count(m.Outbox) == 1
    [clock] = e.all(m.SlaClock)
    assert clock.next_level == 1


def test_a_guard_row_found_only_at_the_insert_rolls_the_batch_back(env, monkeypatch):  # type: ignore[no-untyped-def]
    """The guard rows are inserted last, with what each notice did; the claim looks first.
    When a row is there at the INSERT that the claim did not see (another transaction
    committed it in between), the whole batch rolls back, mail and actions too, and is
    claimed again: the second look sees the row, and nothing goes out twice."""
    e = env([std(levels=[{"percent": 75, "actions": {"priority": 1, "tags": ["late"]}},
                         {"percent": 100}])])
    with Session(e.engine) as s, s.begin():
        add_clock(s, add_ticket(s, 1))
        add_clock(s, add_ticket(s, 2))
    assert len(e.sweeper().sweep(T0 + 50 * MIN).fired) == 2
    with Session(e.engine) as s, s.begin():
        for c in s.scalars(select(m.SlaClock)):
            c.next_level, c.next_notice_at = 0, T0 + 45 * MIN  # rewound by mistake
        for t in s.scalars(select(m.Ticket)):
            t.priority, t.tags = 3, ["printer"]
    real, looks = sweep_mod.Sweeper._claim, []

    def blind_once(self, session, at):  # type: ignore[no-untyped-def]
        rows = real(self, session, at)
        looks.append(len(rows))
        return [(c, t, seen and len(looks) > 1, r) for c, t, seen, r in rows]

    monkeypatch.setattr(sweep_mod.Sweeper, "_claim", blind_once)
    result = e.sweeper().sweep(T0 + 50 * MIN)
    assert result.fired == [] and result.raced == 1 and looks == [2, 2, 0]
    assert e.count(m.SlaNotice) == 2 and e.count(m.Outbox) == 2
    assert sorted((t.priority, t.tags) for t in e.all(m.Ticket)) == [(3, ["printer"])] * 2
    assert [c.next_level for c in e.all(m.SlaClock)] == [1, 1]
    assert not [ev for ev in e.all(m.Event) if ev.type == "sla_warning" and ev.id > 2]


def test_a_guard_row_never_seen_stops_the_sweep_instead_of_spinning(env, monkeypatch):  # type: ignore[no-untyped-def]
    e = env([std()])
    with Session(e.engine) as s, s.begin():
        add_clock(s, add_ticket(s))
    assert len(e.sweeper().sweep(T0 + 50 * MIN).fired) == 1
    with Session(e.engine) as s, s.begin():
        c = s.scalars(select(m.SlaClock)).one()
        c.next_level, c.next_notice_at = 0, T0 + 45 * MIN
    real = sweep_mod.Sweeper._claim
    monkeypatch.setattr(sweep_mod.Sweeper, "_claim", lambda self, session, at: [
        (c, t, False, r) for c, t, _seen, r in real(self, session, at)])
    result = e.sweeper().sweep(T0 + 50 * MIN)
    assert result.fired == [] and result.raced == sweep_mod._MAX_RACED + 1
    assert e.count(m.SlaNotice) == 1 and e.count(m.Outbox) == 1
    [clock] = e.all(m.SlaClock)
    assert clock.next_level == 0  # untouched: the next sweep looks again


def test_cli_sla_sweep_prints_what_fired(env, home):  # type: ignore[no-untyped-def]
    e = env([std()])
    now = datetime.now(UTC)
    with Session(e.engine) as s, s.begin():
        add_clock(s, add_ticket(s), since=now - 50 * MIN)
    proc = home.cli("sla", "sweep", "--json", check=True)
    data = json.loads(proc.stdout)
    assert [(f["kind"], f["recipients"]) for f in data["fired"]] == [
        ("warning", ["alice@example.com"])]
    proc = home.cli("sla", "sweep", check=True)
    assert proc.stdout.decode().strip() == "0 fired, 0 deferred, 0 skipped"


def test_gateway_scheduler_sends_the_notice_through_the_relay(env, home, gateway, sink):  # type: ignore[no-untyped-def]
    e = env([std()], relay={"host": "127.0.0.1", "port": sink.port},
            sla_sweep={"interval": 0.5})
    now = datetime.now(UTC)
    with Session(e.engine) as s, s.begin():
        add_clock(s, add_ticket(s), since=now - 50 * MIN)
    gateway.start()
    [mail] = sink.wait_for(1)
    assert sink.messages[0][1] == ["alice@example.com"]
    assert mail["Auto-Submitted"] == "auto-generated" and "SLA warning" in mail["Subject"]
    wait_until(lambda: e.all(m.Outbox)[0].state == "sent", what="outbox row sent")
    assert e.count(m.SlaNotice) == 1


def test_a_template_that_fails_holds_back_only_its_own_clock(env, home):  # type: ignore[no-untyped-def]
    e = env([std(levels=[{"percent": 75, "template": "sla_custom"}, {"percent": 100}])])
    with Session(e.engine) as s, s.begin():
        add_clock(s, add_ticket(s, 1))  # 75 %: the missing template
        breach = add_clock(s, add_ticket(s, 2), first_percent=100, since=T0 - 20 * MIN)
        breach.next_level = 1  # its warning went out before
    result = e.sweeper().sweep(T0 + 50 * MIN)
    assert [(f.ticket, f.kind) for f in result.fired] == [("2026112510000002", "breach")]
    [failed] = [ev for ev in e.all(m.Event) if ev.type == "sla_notice_failed"]
    assert failed.data["error"].startswith("templates/sla_custom.j2: TemplateNotFound")
    assert e.count(m.SlaNotice) == 1 and e.count(m.Outbox) == 1
    clock = next(c for c in e.all(m.SlaClock) if c.id == 1)
    assert clock.next_level == 0
    assert aware(clock.next_notice_at) == T0 + 55 * MIN
    # The admin adds the template: the next try sends it
    (home.path / "templates" / "sla_custom.j2").write_text(
        "{% block subject %}Custom {{ percent }}{% endblock %}"
        "{% block body %}{{ ticket.title }}{% endblock %}")
    e.renderer = Renderer(home.path / "templates")
    result = e.sweeper().sweep(T0 + 56 * MIN)
    assert [(f.ticket, f.percent) for f in result.fired] == [("2026112510000001", 75)]
    assert message_from_bytes(e.all(m.Outbox)[-1].raw)["Subject"].endswith("Custom 75")


def test_config_check_compiles_the_levels_notice_templates(home):  # type: ignore[no-untyped-def]
    configure(home, [std(levels=[{"percent": 75}, {"percent": 100},
                                 {"percent": 150, "template": "sla_manager"}])])
    proc = home.cli("config", "check")
    assert proc.returncode == 1
    assert ("templates/sla_manager.j2: not found (slas[0] std level 150%)"
            in proc.stderr.decode())
    (home.path / "templates" / "sla_manager.j2").write_text("{% block subject %}x{% endblock %}")
    proc = home.cli("config", "check")
    assert "templates/sla_manager.j2: needs a 'subject' and a 'body' block" in proc.stderr.decode()
    (home.path / "templates" / "sla_manager.j2").write_text(
        "{% block subject %}x{% endblock %}{% block body %}y{% endblock %}")
    home.cli("config", "check", check=True)  # and the shipped sla_warning/sla_breach compile
