"""`mailgw explain` lists the notices fired for each SLA clock: level, when it was reached
and sent (deferred from when), to whom, what its actions did. On SQLite and PostgreSQL.

Calendar office: Europe/Berlin, Mon-Fri 09:00-18:00. SLA std: first response 60 business
minutes, levels 75 % (the owner) and 100 % (the owner and boss@example.com, priority
raised). The ticket opens Fri 2026-11-27 17:00: 75 % at 17:45, the breach at 18:00, outside
working hours once the sweep sees it, so its notice waits for Monday 09:00.
"""

from __future__ import annotations

import json

from sqlalchemy.orm import Session

from mailgw.outbound.render import Renderer
from mailgw.sla.explain import explain_ticket, render_text
from mailgw.sla.sweep import Sweeper
from tests.test_sla_clocks import CONFIG, berlin, open_ticket

STD = {"name": "std", "calendar": "office", "first_response": 60, "levels": [
    {"percent": 75},
    {"percent": 100, "notify": ["owner", "boss@example.com"], "actions": {"priority": "raise"}}]}


def test_explain_lists_the_notices_of_each_clock(home):
    home.update_config(calendars=CONFIG["calendars"], agents=CONFIG["agents"], slas=[STD])
    st = home.settings()
    engine = home.engine()
    try:
        with Session(engine) as s, s.begin():
            t = open_ticket(s, st, berlin(2026, 11, 27, 17, 0))
            t.owner = "bob"
            number = t.number
        sweeper = Sweeper(engine, st, Renderer(home.path / "templates"))
        assert [f.percent for f in sweeper.sweep(berlin(2026, 11, 27, 17, 45, 30)).fired] == [75]
        late = sweeper.sweep(berlin(2026, 11, 27, 18, 30))
        assert late.fired == [] and len(late.deferred) == 1
        assert [f.percent for f in sweeper.sweep(berlin(2026, 11, 30, 9, 0, 10)).fired] == [100]

        with Session(engine) as s:
            from sqlalchemy import select

            from mailgw.store import models as m

            t = s.scalars(select(m.Ticket).where(m.Ticket.number == number)).one()
            data = explain_ticket(s, st, t, now=berlin(2026, 11, 30, 10, 0))
        json.dumps(data)
        fr = next(c for c in data["clocks"] if c["target"] == "first_response")
        warning, breach = fr["notices"]
        assert (warning["level"], warning["percent"], warning["kind"]) == (0, 75, "warning")
        assert warning["reached_at"] == "2026-11-27T17:45:00+01:00"
        assert warning["fired_at"] == "2026-11-27T17:45:30+01:00"
        assert (warning["deferred"], warning["recipients"]) == (False, ["bob@example.com"])
        assert (breach["level"], breach["percent"], breach["kind"]) == (1, 100, "breach")
        assert breach["reached_at"] == "2026-11-27T18:00:00+01:00"
        assert breach["fired_at"] == "2026-11-30T09:00:10+01:00"
        assert breach["deferred"] is True
        assert breach["delay_seconds"] == 63 * 3600 + 10
        assert breach["recipients"] == ["bob@example.com", "boss@example.com"]
        assert breach["changes"] == {"priority": [3, 2]}
        # the solution-less SLA: no other clock, and a clock without notices has an empty list
        assert [c["target"] for c in data["clocks"]] == ["first_response"]

        text = "\n".join(render_text(data))
        assert ("notice: warning 75 % sent Fri 2026-11-27 17:45 (reached Fri 2026-11-27 17:45)"
                " to bob@example.com") in text
        assert ("notice: breach 100 % sent Mon 2026-11-30 09:00, deferred from Fri 2026-11-27 "
                "18:00 (63 h later) to bob@example.com, boss@example.com; priority 3 -> 2"
                ) in text
    finally:
        engine.dispose()
    # the command prints the same
    out = home.cli("explain", number, check=True).stdout.decode()
    assert "notice: breach 100 % sent Mon 2026-11-30 09:00, deferred from Fri" in out
    js = json.loads(home.cli("explain", number, "--json", check=True).stdout)
    fr = next(c for c in js["sla"]["clocks"] if c["target"] == "first_response")
    assert [n["percent"] for n in fr["notices"]] == [75, 100]


def test_a_notice_to_nobody_says_why(home):
    home.update_config(calendars=CONFIG["calendars"], agents=CONFIG["agents"], slas=[STD])
    st = home.settings()
    engine = home.engine()
    try:
        with Session(engine) as s, s.begin():
            t = open_ticket(s, st, berlin(2026, 11, 27, 17, 0))  # no owner
            ticket_id = t.id
        Sweeper(engine, st, Renderer(home.path / "templates")).sweep(
            berlin(2026, 11, 27, 17, 46))
        with Session(engine) as s:
            from mailgw.store import models as m

            data = explain_ticket(s, st, s.get(m.Ticket, ticket_id))
        [n] = data["clocks"][0]["notices"]
        assert n["recipients"] == [] and n["unaddressed"]
        assert " to nobody (" in n["text"]
    finally:
        engine.dispose()
