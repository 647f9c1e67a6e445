"""Agent commands by mail (mailgw/agent_commands.py): parsing, each command's effect on a real
ticket on both stores, all-or-nothing refusals, permissions, #merge and the threader, and the
#pending reminder."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgw import agent_commands as ac
from mailgw import ticket_events
from mailgw.calendar import Calendar, WorkingHours
from mailgw.settings import ConfigError, Settings
from mailgw.store import models as m
from tests.helpers import Harness, mail

AT = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)  # a Friday

AGENTS = [
    {"name": "alice", "addresses": ["alice@example.com"], "queues": ["support", "billing"]},
    {"name": "bob", "addresses": ["bob@example.com"], "queues": ["support"]},
    {"name": "carol", "queues": ["billing"]},
    {"name": "dan", "queues": ["support"], "out_of_office": True},
    {"name": "eve", "queues": ["support"], "commands": ["tag", "take"]},
    {"name": "fred", "queues": ["support"], "move_to": ["billing"]},
]


# ------------------------------------------------------------------------------------------
# Parsing


def names(parsed: ac.Parsed) -> list[tuple[str, tuple[str, ...]]]:
    return [(c.name, c.args) for c in parsed.commands]


def test_parse_commands_at_the_top_case_insensitive_with_blank_lines():
    p = ac.parse_commands("\n\n#Close\n\n#TAG vip, urgent\n#priority Very High\n"
                          "Thanks, fixed.\n#assign bob\n")
    assert names(p) == [("close", ()), ("tag", ("vip,", "urgent")),
                        ("priority", ("Very", "High"))]
    assert [c.line for c in p.commands] == [3, 5, 6]
    # the #assign after the first prose line is text, not a command
    assert p.rest == "Thanks, fixed.\n#assign bob"
    assert not p.note and p.errors == []


def test_parse_stops_at_quoted_text():
    text = "#close\n> #assign bob\n> #pending 3d\nOn Fri, support wrote:\n"
    p = ac.parse_commands(text)
    assert names(p) == [("close", ())]
    assert p.rest.startswith("> #assign bob")


def test_parse_quote_header_first_means_no_commands():
    p = ac.parse_commands("On Fri, Nov 27 support wrote:\n> #close\n")
    assert p.commands == [] and not p.note


def test_parse_signature_after_commands_is_not_rest():
    p = ac.parse_commands("#close\n#tag done\n-- \nAlice Agent\nExample Support\n")
    assert names(p) == [("close", ()), ("tag", ("done",))]
    assert p.rest == ""
    assert p.signature == "-- \nAlice Agent\nExample Support"


def test_parse_html_artefacts_nbsp_zero_width_and_bold():
    text = "\u200b#pending\xa03d\xa0\n\xa0\n**#tag**\xa0vip\n\ufeff#take\nHello"
    p = ac.parse_commands(text)
    assert names(p) == [("pending", ("3d",)), ("tag", ("vip",)), ("take", ())]
    assert p.rest == "Hello"


def test_parse_tolerates_punctuation_after_the_name():
    p = ac.parse_commands("#close.\n#pending: 3d\n#tag! x\nBye")
    assert names(p) == [("close", ()), ("pending", ("3d",)), ("tag", ("x",))]
    assert p.rest == "Bye"


def test_parse_note_marks_internal_and_keeps_its_text():
    p = ac.parse_commands("#note called the customer, all fine\nmore detail\n")
    assert p.note and p.commands == []
    assert p.rest == "called the customer, all fine\nmore detail"
    p = ac.parse_commands("#close\n#NOTE\n\nInternal: refund done.")
    assert p.note and names(p) == [("close", ())] and p.rest == "Internal: refund done."


def test_parse_malformed_lines_are_errors_and_hash_prose_is_not_a_command():
    p = ac.parse_commands("#assign\n#close now\n#pending\n")
    assert [c.name for c in p.errors] == ["assign", "close", "pending"]
    assert "needs an agent's name" in p.errors[0].error
    assert "takes no argument" in p.errors[1].error
    # "#1" or "# heading" is prose: the agent's text starts there
    p = ac.parse_commands("#1 priority for us is your uptime\n#close")
    assert p.commands == [] and p.rest.startswith("#1 priority")


# ------------------------------------------------------------------------------------------
# #pending arguments


BERLIN = Calendar(WorkingHours(timezone="Europe/Berlin",
                               **{d: ["09:00-17:00"] for d in ("mon", "tue", "wed", "thu", "fri")}))


@pytest.mark.parametrize("text,expected", [
    ("3d", AT + timedelta(days=3)),
    ("4h", AT + timedelta(hours=4)),
    ("30m", AT + timedelta(minutes=30)),
    ("1w 2d", AT + timedelta(days=9)),
    ("2 days", AT + timedelta(days=2)),
    ("1h30m", AT + timedelta(minutes=90)),
])
def test_pending_durations(text, expected):
    assert ac.pending_time(text, AT) == expected


def test_pending_dates_in_the_agents_calendar():
    # a date: the start of that day's working time in the agent's zone (09:00 CET = 08:00 UTC)
    assert ac.pending_time("2026-12-01", AT, BERLIN) == datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    assert ac.pending_time("2026-12-01 14:30", AT, BERLIN) == datetime(2026, 12, 1, 13, 30,
                                                                       tzinfo=UTC)
    # AT is a Friday: monday is the coming one; "fri" is next week's, never today
    assert ac.pending_time("monday", AT, BERLIN) == datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
    assert ac.pending_time("fri", AT, BERLIN) == datetime(2026, 12, 4, 8, 0, tzinfo=UTC)
    # tomorrow is a Saturday without working hours: its midnight, not Monday
    assert ac.pending_time("tomorrow", AT, BERLIN) == datetime(2026, 11, 27, 23, 0, tzinfo=UTC)
    # without a calendar: UTC midnight
    assert ac.pending_time("2026-12-01", AT) == datetime(2026, 12, 1, tzinfo=UTC)


@pytest.mark.parametrize("text", ["soon", "3 fortnights", "0d", "2026-13-01", "400d"])
def test_pending_nonsense_is_refused(text):
    with pytest.raises(ac.Refused):
        ac.pending_time(text, AT)


# ------------------------------------------------------------------------------------------
# Executing on tickets in a real store


class Desk:
    """A store with tickets made by the worker from real mail, and agents in the config."""

    def __init__(self, home, agents: list[dict] = AGENTS) -> None:  # type: ignore[no-untyped-def]
        home.update_config(agents=agents)
        self.h = Harness(home)
        self.settings: Settings = self.h.settings

    def ticket(self, subject: str = "help", sender: str = "cust@customer.test",
               msgid: str | None = None, to: str = "support@example.com") -> int:
        self.h.put(mail(subject, sender=sender, msgid=msgid, to=to), rcpt=to)
        self.h.drain()
        return self.h.tickets()[-1].id

    def run(self, ticket_id: int, agent: str, text: str,
            at: datetime = AT) -> list[ac.Result]:
        with Session(self.h.engine) as s, s.begin():
            t = s.get(m.Ticket, ticket_id)
            parsed = ac.parse_commands(text)
            return ac.execute(s, self.settings, t, self.settings.agent(agent), parsed.commands,
                              at=at)

    def get(self, ticket_id: int) -> m.Ticket:
        with Session(self.h.engine) as s:
            return s.get(m.Ticket, ticket_id)

    def events(self, ticket_id: int, type_: str) -> list[m.Event]:
        with Session(self.h.engine) as s:
            return list(s.scalars(select(m.Event).where(
                m.Event.ticket_id == ticket_id, m.Event.type == type_).order_by(m.Event.id)))


@pytest.fixture
def desk(home):  # type: ignore[no-untyped-def]
    d = Desk(home)
    yield d
    d.h.close()


@pytest.fixture
def changed(monkeypatch):  # type: ignore[no-untyped-def]
    """What ticket_events.ticket_changed was told (the SLA clocks' seam), call by call."""
    calls: list[dict[str, Any]] = []
    real = ticket_events.ticket_changed

    def record(session, settings, ticket, changes, *, at, reason=""):  # type: ignore[no-untyped-def]
        calls.append({"ticket": ticket.id, "changes": dict(changes), "reason": reason, "at": at})
        real(session, settings, ticket, changes, at=at, reason=reason)

    monkeypatch.setattr(ticket_events, "ticket_changed", record)
    return calls


def aware(v: datetime | None) -> datetime | None:
    return v.replace(tzinfo=UTC) if v is not None and v.tzinfo is None else v


def test_close_sets_state_and_closed_at_and_tells_the_sla_seam(desk, changed):
    tid = desk.ticket()
    results = desk.run(tid, "alice", "#close\nAll done.")
    assert [(r.ok, r.message) for r in results] == [(True, "closed")]
    t = desk.get(tid)
    assert t.state == "closed" and aware(t.closed_at) == AT
    assert changed == [{"ticket": tid, "changes": {"state": ("new", "closed"),
                                                   "closed_at": (None, AT)},
                        "reason": "agent alice: #close", "at": AT}]
    [ev] = desk.events(tid, "agent_command")
    assert ev.data["agent"] == "alice" and ev.data["command"] == "#close"
    assert ev.data["changes"]["state"] == ["new", "closed"]


def test_reopen_and_open(desk):
    tid = desk.ticket()
    desk.run(tid, "alice", "#close")
    results = desk.run(tid, "bob", "#reopen")
    assert results[0].ok and results[0].changes["state"] == ("closed", "open")
    t = desk.get(tid)
    assert t.state == "open" and t.closed_at is None
    assert desk.run(tid, "bob", "#open")[0].message == "already open"


def test_pending_sets_state_and_time_then_wake_pending_reopens(desk, changed):
    tid = desk.ticket()
    results = desk.run(tid, "alice", "#pending 4h")
    assert results[0].ok, results[0].message
    t = desk.get(tid)
    assert t.state == "pending" and aware(t.pending_until) == AT + timedelta(hours=4)
    with Session(desk.h.engine) as s, s.begin():
        assert ac.wake_pending(s, desk.settings, AT + timedelta(hours=3, minutes=59)) == 0
    assert desk.get(tid).state == "pending"
    later = AT + timedelta(hours=4, minutes=1)
    with Session(desk.h.engine) as s, s.begin():
        assert ac.wake_pending(s, desk.settings, later) == 1
    t = desk.get(tid)
    assert t.state == "open" and t.pending_until is None
    [ev] = [e for e in desk.events(tid, "state_changed") if "pending reminder" in
            e.data.get("reason", "")]
    assert ev.data["old"] == "pending" and ev.data["new"] == "open"
    assert changed[-1]["changes"]["state"] == ("pending", "open")
    assert changed[-1]["reason"].startswith("pending reminder")
    with Session(desk.h.engine) as s, s.begin():  # woken once only
        assert ac.wake_pending(s, desk.settings, later + timedelta(hours=1)) == 0


def test_wake_pending_job_commits_and_clears_stale_reminders(desk):
    tid, other = desk.ticket(), desk.ticket("other", sender="o@customer.test")
    past = datetime.now(UTC) - timedelta(hours=2)
    assert desk.run(tid, "alice", "#pending 1h", at=past)[0].ok
    assert desk.run(other, "alice", "#pending 1h", at=past)[0].ok
    # the customer answers the other one: the worker reopens it and ends its reminder
    desk.h.put(mail(f"Re: other [Ticket#{desk.get(other).number}]", sender="o@customer.test"))
    desk.h.drain()
    assert desk.get(other).state == "open" and desk.get(other).pending_until is None
    assert ac.wake_pending_job(desk.h.engine, desk.settings) == 1
    assert desk.get(tid).state == "open"
    assert desk.get(other).pending_until is None  # cleared, not "woken" a second time
    assert len([e for e in desk.events(other, "state_changed")
                if "pending reminder" in e.data.get("reason", "")]) == 0


def test_pending_close_closes_when_the_time_passes(desk, changed):
    """OTRS "pending auto close": ``#pending 4h close`` closes instead of reopening."""
    tid = desk.ticket()
    [r] = desk.run(tid, "alice", "#pending 4h close")
    assert r.ok and r.message.endswith(", then closed"), r.message
    t = desk.get(tid)
    assert (t.state, t.pending_action) == ("pending", "close")
    later = AT + timedelta(hours=4, minutes=1)
    with Session(desk.h.engine) as s, s.begin():
        assert ac.wake_pending(s, desk.settings, later) == 1
    t = desk.get(tid)
    assert (t.state, t.pending_until, t.pending_action) == ("closed", None, None)
    assert aware(t.closed_at) == later
    [ev] = [e for e in desk.events(tid, "state_changed")
            if "pending auto close" in e.data.get("reason", "")]
    assert (ev.data["old"], ev.data["new"]) == ("pending", "closed")
    assert changed[-1]["changes"]["state"] == ("pending", "closed")
    assert changed[-1]["reason"].startswith("pending auto close")
    with Session(desk.h.engine) as s, s.begin():  # once only
        assert ac.wake_pending(s, desk.settings, later + timedelta(hours=1)) == 0


def test_pending_close_words_and_a_later_reminder(desk):
    tid = desk.ticket()
    [r] = desk.run(tid, "alice", "#pending close")
    assert not r.ok and "needs a duration" in r.message
    assert desk.run(tid, "alice", "#pending autoclose monday")[0].ok
    assert desk.get(tid).pending_action == "close"
    # a plain #pending afterwards is a reminder again, #open drops the action
    assert desk.run(tid, "alice", "#pending 2h")[0].ok
    assert desk.get(tid).pending_action is None
    assert desk.run(tid, "alice", "#pending 1d close")[0].ok
    assert desk.run(tid, "alice", "#open")[0].ok
    t = desk.get(tid)
    assert (t.state, t.pending_until, t.pending_action) == ("open", None, None)


def test_customer_reply_before_auto_close_keeps_the_ticket_open(desk):
    tid = desk.ticket("other", sender="o@customer.test")
    past = datetime.now(UTC) - timedelta(hours=2)
    assert desk.run(tid, "alice", "#pending 1h close", at=past)[0].ok
    desk.h.put(mail(f"Re: other [Ticket#{desk.get(tid).number}]", sender="o@customer.test"))
    desk.h.drain()
    assert desk.get(tid).state == "open"
    assert ac.wake_pending_job(desk.h.engine, desk.settings) == 0
    t = desk.get(tid)
    assert (t.state, t.pending_until, t.pending_action) == ("open", None, None)


def test_assign_take_priority_queue_tag_untag(desk):
    tid = desk.ticket()
    r = desk.run(tid, "alice", "#assign Bob\n#priority critical\n#tag vip,urgent\n#tag vip")
    assert all(x.ok for x in r), [x.message for x in r]
    t = desk.get(tid)
    assert (t.owner, t.priority, t.tags) == ("bob", 1, ["vip", "urgent"])
    r = desk.run(tid, "bob", "#take\n#priority 4\n#untag urgent")
    assert all(x.ok for x in r)
    assert r[0].message == "already assigned to bob" and r[0].changes == {}
    t = desk.get(tid)
    assert (t.owner, t.priority, t.tags) == ("bob", 4, ["vip"])
    assert desk.run(tid, "alice", "#take")[0].changes == {"owner": ("bob", "alice")}
    # by address, too
    assert desk.run(tid, "alice", "#assign bob@example.com")[0].ok
    r = desk.run(tid, "alice", "#queue billing\n#assign carol")  # carol serves billing only
    assert all(x.ok for x in r), [x.message for x in r]
    t = desk.get(tid)
    assert (t.queue, t.owner) == ("billing", "carol")


@pytest.mark.parametrize("word,value", [("very low", 5), ("low", 4), ("normal", 3),
                                        ("high", 2), ("very-high", 1), ("2", 2)])
def test_priority_names_follow_the_matrix_1_is_highest(word, value):
    assert ac.parse_priority(word) == value
    assert ac.parse_priority("critical") == 1
    with pytest.raises(ac.Refused):
        ac.parse_priority("6")


def test_one_bad_command_changes_nothing(desk, changed):
    tid = desk.ticket()
    before = desk.get(tid)
    results = desk.run(tid, "alice", "#close\n#assign zed\n#tag x\nThanks")
    assert ac.refused(results)
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].message == "no agent named zed"
    t = desk.get(tid)
    assert (t.state, t.owner, t.tags, t.closed_at) == (before.state, before.owner, before.tags,
                                                       None)
    assert changed == [] and desk.events(tid, "agent_command") == []
    [ev] = desk.events(tid, "agent_commands_refused")
    assert [x["ok"] for x in ev.data["results"]] == [True, False, True]
    text = ac.refusal_text(results)
    assert text.splitlines() == [
        "Nothing was changed: 1 of 3 command(s) refused, and commands are applied all "
        "together or not at all.",
        "line 1: #close: not applied (another command was refused)",
        "line 2: #assign zed: refused: no agent named zed",
        "line 3: #tag x: not applied (another command was refused)",
    ]
    assert ac.refusal_text([r for r in results if r.ok]) == ""


def test_unknown_command_is_refused_with_the_known_ones(desk):
    tid = desk.ticket()
    [r] = desk.run(tid, "alice", "#clsoe")
    assert not r.ok
    assert r.message.startswith("unknown command #clsoe; known: #close, #pending, #open,")
    assert "#merge" in r.message and "#note" in r.message
    assert desk.get(tid).state == "new"


def test_malformed_command_and_conflicting_states_are_refused(desk):
    tid = desk.ticket()
    r = desk.run(tid, "alice", "#assign")
    assert not r[0].ok and "needs an agent's name" in r[0].message
    r = desk.run(tid, "alice", "#close\n#pending 3d")
    assert [x.ok for x in r] == [True, False]
    assert r[1].message.startswith("conflicts with #close on line 1")
    r = desk.run(tid, "alice", "#pending 2020-01-01")
    assert not r[0].ok and "in the past" in r[0].message
    assert desk.get(tid).state == "new"


def test_permissions(desk):
    tid = desk.ticket()  # queue support
    # carol serves billing only: nothing on a support ticket
    [r] = desk.run(tid, "carol", "#tag x")
    assert not r.ok and r.message == "carol does not serve queue support, the ticket's queue"
    # eve may use #tag and #take only
    r = desk.run(tid, "eve", "#take\n#close")
    assert [x.ok for x in r] == [True, False]
    assert r[1].message == "eve may not use #close (allowed: #tag, #take)"
    assert desk.get(tid).owner is None
    # the alias counts as its command
    assert desk.run(tid, "eve", "#untag x")[0].ok
    # bob may not move to billing (not his queue); fred may (move_to)
    [r] = desk.run(tid, "bob", "#queue billing")
    assert not r.ok and "may not move tickets to queue billing" in r.message
    [r] = desk.run(tid, "alice", "#queue nowhere")
    assert not r.ok and r.message.startswith("no queue named nowhere; queues: support, billing")
    # assignees must serve the queue and be in
    [r] = desk.run(tid, "alice", "#assign carol")
    assert not r.ok and r.message == "carol does not serve queue support"
    [r] = desk.run(tid, "alice", "#assign dan")
    assert not r.ok and r.message == "dan is out of office"
    assert desk.get(tid).queue == "support" and desk.get(tid).owner is None
    [r] = desk.run(tid, "fred", "#queue billing")
    assert r.ok and desk.get(tid).queue == "billing"
    # and now fred, who does not serve billing, cannot touch it any more
    [r] = desk.run(tid, "fred", "#close")
    assert not r.ok and "does not serve queue billing" in r.message


def test_merge_moves_articles_and_the_threader_follows(desk, changed):
    a = desk.ticket("printer broken", sender="ann@customer.test", msgid="a1@customer.test")
    desk.h.put(mail("Re: printer broken", sender="ann@customer.test", msgid="a2@customer.test",
                    In_Reply_To="<a1@customer.test>"))
    desk.h.drain()
    # a colleague of Ann's writes on the first ticket too
    desk.h.put(mail(f"Re: printer broken [Ticket#{desk.get(a).number}]",
                    sender="ben@customer.test", msgid="a-ben@customer.test",
                    In_Reply_To="<a1@customer.test>"))
    desk.h.drain()
    b = desk.ticket("printer still broken", sender="ann@customer.test",
                    msgid="b1@customer.test")
    assert a != b
    moved = [x.id for x in desk.h.articles(a)]
    assert len(moved) >= 3  # the customers' mails and our acknowledgements
    number_b = desk.get(b).number
    r = desk.run(a, "alice", f"#merge Ticket#{number_b}")
    assert r[0].ok, r[0].message
    assert desk.h.articles(a) == []
    assert {x.id for x in desk.h.articles(b)} >= set(moved)
    ta = desk.get(a)
    assert ta.state == "merged" and ta.merged_into == b
    assert desk.events(a, "ticket_merged")[0].data["into"] == number_b
    assert desk.events(b, "ticket_merged")[0].data["from"] == ta.number
    assert desk.events(b, "ticket_merged")[0].data["articles"] == len(moved)
    assert changed[-1]["ticket"] == a and changed[-1]["changes"]["state"] == ("new", "merged")
    # the customer answers the merged ticket's first mail: it lands on the target
    desk.h.put(mail("Re: printer broken", sender="ann@customer.test", msgid="a3@customer.test",
                    In_Reply_To="<a1@customer.test>"))
    # and quotes only the old number in the subject
    desk.h.put(mail(f"Re: printer broken [Ticket#{ta.number}]", sender="ann@customer.test",
                    msgid="a4@customer.test"))
    # and Ben, whose article moved with the others, writes with the old number only
    desk.h.put(mail(f"Re: printer broken [Ticket#{ta.number}]", sender="ben@customer.test",
                    msgid="a5@customer.test"))
    desk.h.drain()
    new_ids = ["a3@customer.test", "a4@customer.test", "a5@customer.test"]
    with Session(desk.h.engine) as s:
        got = {x.message_id: x for x in s.scalars(select(m.Article).where(
            m.Article.message_id.in_(new_ids)))}
        assert ac.resolve_merged(s, s.get(m.Ticket, a)).id == b
        assert ac.resolve_merged(s, s.get(m.Ticket, b)).id == b
    assert sorted(got) == new_ids
    assert {x.ticket_id for x in got.values()} == {b}
    assert "merged into ticket" in got["a4@customer.test"].thread_reason
    assert "merged into ticket" in got["a5@customer.test"].thread_reason
    assert desk.get(a).state == "merged" and len(desk.h.tickets()) == 2
    # nothing more on the merged ticket
    [r] = desk.run(a, "alice", "#close")
    assert not r.ok and r.message == f"the ticket is merged into Ticket#{number_b}; write to " \
                                     "that ticket instead"


def test_merge_refusals(desk):
    a = desk.ticket("one", sender="x@customer.test")
    b = desk.ticket("two", sender="y@customer.test")
    c = desk.ticket("three", sender="z@customer.test", to="billing@example.com")
    na, nb, nc = (desk.get(x).number for x in (a, b, c))
    [r] = desk.run(a, "alice", f"#merge Ticket#{na}")
    assert not r.ok and r.message == "a ticket cannot be merged into itself"
    [r] = desk.run(a, "alice", "#merge Ticket#999")
    assert not r.ok and r.message == "no ticket Ticket#999"
    [r] = desk.run(a, "alice", "#merge yesterday's")
    assert not r.ok and "is not a ticket number" in r.message
    [r] = desk.run(a, "bob", f"#merge [Ticket#{nc}]")  # bob does not serve billing
    assert not r.ok and "does not serve queue billing" in r.message
    desk.run(b, "alice", "#close")
    [r] = desk.run(a, "alice", f"#merge {nb}")
    assert not r.ok and r.message.endswith("is closed; merge only into a ticket that is not "
                                           "closed or merged")
    assert desk.h.articles(a) and desk.get(a).state == "new"


def test_gateway_scheduler_reopens_a_due_pending_ticket_at_start(home, gateway):
    from tests.conftest import wait_until

    d = Desk(home)
    tid = d.ticket()
    assert d.run(tid, "alice", "#pending 1h", at=datetime.now(UTC) - timedelta(hours=2))[0].ok
    assert d.get(tid).state == "pending"
    gateway.start("--role", "scheduler")
    wait_until(lambda: d.get(tid).state == "open", what="the pending reminder job")
    assert d.get(tid).pending_until is None
    assert gateway.stop() == 0
    d.h.close()


# ------------------------------------------------------------------------------------------
# Settings


def test_agent_commands_setting_is_checked(home):
    data = home.config()
    data["agents"] = [{"name": "x", "queues": ["support"], "commands": ["close", "fly"]}]
    home.write_config(data)
    with pytest.raises(ConfigError, match="unknown command"):
        home.settings()
    data["agents"] = [{"name": "x", "queues": ["support"], "move_to": ["nowhere"]}]
    home.write_config(data)
    with pytest.raises(ConfigError, match="move_to names unknown queue 'nowhere'"):
        home.settings()
    data["agents"] = [{"name": "x", "queues": ["support"],
                       "commands": ["#Close", "tag", "untag", "Reopen", "note"]}]
    home.write_config(data)
    assert home.settings().agent("x").commands == ["close", "tag", "open"]


def test_a_state_set_otherwise_ends_the_pending_time(desk):
    """Only #pending sets a pending time: a customer's reopen, `mailgw tickets state` and a
    filter rule's state end it, so an old "#pending … close" cannot close the ticket later
    when something else sets it pending again."""
    tid = desk.ticket("other", sender="o@customer.test")
    past = datetime.now(UTC) - timedelta(hours=2)
    assert desk.run(tid, "alice", "#pending 1h close", at=past)[0].ok
    desk.h.put(mail(f"Re: other [Ticket#{desk.get(tid).number}]", sender="o@customer.test"))
    desk.h.drain()
    t = desk.get(tid)
    assert (t.state, t.pending_until, t.pending_action) == ("open", None, None)
    assert desk.run(tid, "alice", "#pending 1h close", at=past)[0].ok
    desk.h.home.cli("tickets", "state", desk.get(tid).number, "pending", check=True)
    t = desk.get(tid)
    assert (t.state, t.pending_until, t.pending_action) == ("pending", None, None)
    assert ac.wake_pending_job(desk.h.engine, desk.settings) == 0
    assert desk.get(tid).state == "pending"
