"""Auto-assignment through the worker, on both stores: fairness over 100 tickets, skills,
sticky owners, and availability (out of office, working hours) with the queue as fallback."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest

from mailgw.assign import unavailable_reason
from mailgw.settings import Settings
from tests.test_filters_worker import FilterHarness, mail

NEVER = {"name": "never", "timezone": "UTC"}  # no working hours on any day
ALWAYS = {"name": "always", "timezone": "Pacific/Auckland",
          **{d: ["00:00-24:00"] for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}}


def configure(home, strategy: str, agents: list[dict], sticky: bool = False,  # type: ignore[no-untyped-def]
              rules: str = "rules: []\n") -> FilterHarness:
    data = home.config()
    data["calendars"] = [NEVER, ALWAYS]
    data["agents"] = agents
    data["queues"][0]["assignment"] = {"strategy": strategy, "sticky": sticky}
    home.write_config(data)
    (home.path / "filters" / "00-default.yaml").unlink()  # only the test's rules
    return FilterHarness(home, rules)


def owners(hx: FilterHarness) -> Counter[str | None]:
    return Counter(t.owner for t in hx.tickets())


def agents(*names: str, **extra) -> list[dict]:  # type: ignore[no-untyped-def]
    return [{"name": n, "queues": ["support"], **extra.get(n, {})} for n in names]


@pytest.fixture
def close_after():  # type: ignore[no-untyped-def]
    made: list[FilterHarness] = []
    yield made
    for h in made:
        h.close()


def test_round_robin_is_fair_over_100_tickets(home, close_after):
    hx = configure(home, "round_robin", agents("ann", "ben", "cy", "dee"))
    close_after.append(hx)
    hx.put(*[mail(f"request {i}", sender=f"c{i}@customer.test") for i in range(100)])
    hx.drain()
    assert owners(hx) == {"ann": 25, "ben": 25, "cy": 25, "dee": 25}
    # strictly in turn
    assert [t.owner for t in hx.tickets()[:6]] == ["ann", "ben", "cy", "dee", "ann", "ben"]


def test_least_open_evens_out_an_imbalance_over_100_tickets(home, close_after):
    rules = """
        rules:
          - name: old-backlog
            when: {subject: backlog}
            then: {owner: ann}
    """
    hx = configure(home, "least_open", agents("ann", "ben", "cy", "dee"), rules=rules)
    close_after.append(hx)
    hx.put(*[mail(f"backlog {i}", sender=f"b{i}@customer.test") for i in range(10)])
    hx.drain()
    assert owners(hx) == {"ann": 10}
    hx.put(*[mail(f"request {i}", sender=f"c{i}@customer.test") for i in range(90)])
    hx.drain()
    assert owners(hx) == {"ann": 25, "ben": 25, "cy": 25, "dee": 25}
    # ann got no new ticket before the others had caught up with her 10
    new = [t.owner for t in hx.tickets()[10:]]
    assert "ann" not in new[:30]
    [ev] = [e for e in hx.events("assigned") if e.data["strategy"] == "rule"][:1]
    assert ev.data["reason"] == "set by rule 'old-backlog'"


def test_unavailable_agents_are_skipped_and_nobody_means_the_queue(home, close_after):
    team = agents("ann", "ben", "cy", ann={"out_of_office": True}, ben={"calendar": "never"},
                  cy={"calendar": "always"})
    hx = configure(home, "round_robin", team)
    close_after.append(hx)
    hx.put(*[mail(f"r{i}", sender=f"c{i}@customer.test") for i in range(5)])
    hx.drain()
    assert owners(hx) == {"cy": 5}
    ev = hx.events("assigned")[0]
    assert ev.data["unavailable"]["ann"] == "out of office"
    assert ev.data["unavailable"]["ben"].startswith("outside working hours")
    # cy goes out of office too: nobody is available, the ticket stays in the queue
    data = home.config()
    data["agents"][2]["out_of_office"] = True
    home.write_config(data)
    hx.set_rules("rules: []\n")
    hx.put(mail("nobody here", sender="z@customer.test"))
    hx.drain()
    last = hx.tickets()[-1]
    assert last.owner is None and last.queue == "support"
    assert hx.events("assigned")[-1].data["reason"] == "no agent is available; it stays in the queue"


def test_skills_follow_rule_tags(home, close_after):
    rules = """
        rules:
          - {name: linux, when: {subject: {regex: '(?i)linux'}}, then: {tags: [linux]}}
          - {name: win, when: {subject: {regex: '(?i)windows'}}, then: {tags: [windows]}}
          - {name: vip, when: {subject: {regex: '(?i)vip'}}, then: {tags: [vip]}}
    """
    team = agents("ann", "ben", "cy", ann={"skills": ["linux"]}, ben={"skills": ["windows"]},
                  cy={"skills": ["linux", "windows"], "out_of_office": True})
    hx = configure(home, "skills", team, rules=rules)
    close_after.append(hx)
    hx.put(mail("Linux box down", sender="a@c.test"), mail("Windows update", sender="b@c.test"),
           mail("Linux and Windows", sender="c@c.test"), mail("VIP question", sender="d@c.test"))
    hx.drain()
    ts = hx.tickets()
    assert [t.owner for t in ts[:2]] == ["ann", "ben"]
    # cy has both skills but is away; ann and ben have one each: the less loaded one
    assert ts[2].owner in ("ann", "ben")
    assert "has 1 of linux, windows" in hx.events("assigned")[2].data["reason"]
    # no tag is a skill: least open among everyone available
    assert ts[3].owner in ("ann", "ben") and ts[3].owner != ts[2].owner


def test_sticky_follow_up_keeps_owner_and_known_customer_returns(home, close_after):
    hx = configure(home, "round_robin", agents("ann", "ben", "cy"), sticky=True)
    close_after.append(hx)
    hx.put(mail("first", sender="repeat@customer.test", msgid="s1@c"),
           mail("other", sender="other@customer.test"))
    hx.drain()
    first, other = hx.tickets()
    assert (first.owner, other.owner) == ("ann", "ben")
    # a follow-up keeps its owner, a new ticket from the same customer goes back to ann
    hx.put(mail("Re: first", sender="repeat@customer.test", In_Reply_To="<s1@c>"),
           mail("second problem", sender="repeat@customer.test"))
    hx.drain()
    ts = hx.tickets()
    assert len(ts) == 3 and ts[0].owner == "ann" and ts[2].owner == "ann"
    assert hx.events("assigned")[-1].data["strategy"] == "sticky"
    # ann away: the customer's next ticket goes on with round robin
    data = home.config()
    data["agents"][0]["out_of_office"] = True
    home.write_config(data)
    hx.set_rules("rules: []\n")
    hx.put(mail("third problem", sender="repeat@customer.test"))
    hx.drain()
    last = hx.tickets()[-1]
    assert last.owner == "cy"
    assert "sticky owner ann skipped (out of office)" in hx.events("assigned")[-1].data["reason"]


def test_working_hours_in_the_agents_time_zone():
    s = Settings.model_validate({
        "queues": [{"name": "support", "addresses": ["s@example.com"]}],
        "agents": [{"name": "kim", "working_hours": {
            "timezone": "Asia/Tokyo", "mon": ["09:00-18:00"], "holidays": ["2026-11-30"]}},
            {"name": "lee"}],
    })
    kim, lee = s.agents
    mon_10_tokyo = datetime(2026, 11, 23, 1, 0, tzinfo=UTC)  # Monday 10:00 JST
    assert unavailable_reason(kim, s, mon_10_tokyo) is None
    assert unavailable_reason(kim, s, datetime(2026, 11, 23, 10, 0, tzinfo=UTC)) == \
        "outside working hours (Mon 19:00 JST)"
    assert unavailable_reason(kim, s, datetime(2026, 11, 30, 1, 0, tzinfo=UTC)).startswith(
        "outside working hours")  # a holiday
    assert unavailable_reason(lee, s, mon_10_tokyo) is None  # no hours: always available


@pytest.mark.parametrize("bad, message", [
    ({"agents": [{"name": "x", "queues": ["nope"]}]}, "agent x: unknown queue 'nope'"),
    ({"agents": [{"name": "x", "calendar": "nope"}]}, "agent x: unknown calendar 'nope'"),
    ({"agents": [{"name": "x"}, {"name": "x"}]}, "agent names must be unique, repeated: x"),
    ({"calendars": [{"name": "c", "timezone": "Mars/Olympus"}]}, "unknown time zone 'Mars/Olympus'"),
    ({"calendars": [{"name": "c", "mon": ["17:00-09:00"]}]}, "ends before it starts"),
])
def test_invalid_agent_settings(bad, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as exc:
        Settings.model_validate({"queues": [{"name": "support", "addresses": ["s@e.com"]}],
                                 **bad})
    assert message in str(exc.value)


def test_least_open_workers_take_turns_on_postgresql(home, close_after):
    """Two workers assigning in one queue at once: the second waits for the first's commit and
    then counts its ticket, so the two new tickets go to two agents, not both to the one that
    looked least loaded in both snapshots."""
    import threading

    from sqlalchemy.orm import Session

    from mailgw.assign import choose_owner
    from mailgw.store import models as m

    if not home.store_url.startswith("postgresql"):
        pytest.skip("SQLite has a single writer: two assignments cannot overlap")
    hx = configure(home, "least_open", agents("ann", "ben"))
    close_after.append(hx)
    queue = hx.settings.queues[0]
    at = datetime(2026, 11, 27, 10, tzinfo=UTC)

    def assign(session: Session) -> str | None:
        owner = choose_owner(session, hx.settings, queue, tags=[], customer="", at=at).owner
        session.add(m.Ticket(number=f"T-{owner}-{threading.get_ident()}", title="t",
                             queue=queue.name, state="new", priority=3, customer="c@x.test",
                             owner=owner, created_at=at, updated_at=at))
        session.flush()
        return owner

    second: list[str | None] = []

    def other_worker() -> None:
        with Session(hx.engine) as s:
            second.append(assign(s))
            s.commit()

    t = threading.Thread(target=other_worker)
    with Session(hx.engine) as first:
        assert assign(first) == "ann"  # ties go to the agent listed first
        t.start()
        t.join(0.5)
        waited = t.is_alive()
        first.commit()
    t.join(10)
    assert waited, "the second assignment did not wait for the first transaction"
    assert second == ["ben"]
