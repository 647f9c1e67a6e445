"""`mailgw report sla` on a hand-computed fixture, on SQLite and PostgreSQL.

The clocks are written directly (as sla-core's engine would leave them), so every expected
number below is worked out by hand in the comments, not by the report code.

The fixture (all times UTC; range 2026-11-02 00:00 .. 2026-11-09 00:00, Mon..Mon).
Calendar ``office``: Mon-Fri 09:00-17:00 UTC. ``cal``: the clock's calendar (None = 24x7).
"Open" clocks are due in 2099; "in progress" breaches are undecided clocks past their goal.

"business" is the SLA-counted time the engine keeps on a stopped clock (``used_seconds``: the
running spans of its ledger in its calendar, pauses excluded); "wall" is stop - start.

ticket queue   prio created        target  outcome                 wall      business (cal)
T1     support 2    Mon 02 10:00   FR      met  10:00-10:30        1800      1800 (office)
                                   SOL     met  ->Tue 10:00        86400     79200 (24x7,
                                                                             2 h pending)
T2     support 2    Mon 02 16:00   FR      met  ->Tue 10:00        64800     7200 (office:
                                                                             Mon 16-17, Tue 9-10)
                                   SOL     open
T3     support 3    Tue 03 09:00   FR      breached ->11:00        7200      7200 (24x7)
                                   UPD #1  met  12:00-12:20        1200      1200 (24x7)
                                   UPD #2  running, due Tue 14:00 (past) -> breached, no time
                                   SOL     met  ->Wed 09:00        86400     86400 (24x7)
T4     support 3    Wed 04 12:00   FR      met  12:00-12:45        2700      2700 (office)
                                   SOL     cancelled
T5     billing 2    Wed 04 18:00   FR      met  ->Thu 09:30        55800     1800 (office:
                                                                             Thu 9:00-9:30)
                                   SOL     breached ->Fri 18:00    172800    43200 (office:
                                                                             Thu 8h + Fri 8h,
                                                                             pending Thu 9-13)
T6     billing 3    Thu 05 08:00   FR      breached 08:00-12:00    14400     14400 (24x7)
                                   SOL     paused, 4000 s used of 60 min -> breached, no time
T7     billing 3    Sat 07 10:00   FR      open (office)
                                   SOL     open
T9     support 2    Fri 06 09:00   (no SLA, no clocks)
T10    billing 2    Fri 06 10:00   FR      running, breached_at Fri 11:00 -> breached, no time
                                   SOL     open
T0     support 2    Sun 01 23:59:59  FR met (outside the UTC range; inside it in Europe/Berlin)
T8     support 2    Mon 09 00:00     FR met (outside: the end is excluded)

Median: the middle value, the mean of the two middle ones for an even count. p90: nearest
rank, the ceil(0.9 n)-th smallest value.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from html.parser import HTMLParser

import pytest
from sqlalchemy.orm import Session

from mailgw.sla.report import build_report, median, p90, to_html
from mailgw.store import models as m

RANGE = ("--from", "2026-11-02", "--to", "2026-11-09")
FAR = datetime(2099, 1, 1, tzinfo=UTC)
OFFICE = {"name": "office", "timezone": "UTC",
          **{d: ["09:00-17:00"] for d in ("mon", "tue", "wed", "thu", "fri")}}


def at(day: int, hh: int, mm: int = 0, ss: int = 0) -> datetime:
    return datetime(2026, 11, day, hh, mm, ss, tzinfo=UTC)


def add_ticket(s: Session, n: int, queue: str, prio: int, created: datetime,
               sla: str | None = "std") -> m.Ticket:
    t = m.Ticket(number=f"20261102100000{n:02d}", title=f"T{n}", queue=queue, state="open",
                 priority=prio, customer=f"c{n}@customer.test", created_at=created,
                 updated_at=created, sla=sla)
    s.add(t)
    s.flush()
    return t


def clock(s: Session, t: m.Ticket, target: str, start: datetime, *, outcome: str | None = None,
          stop: datetime | None = None, goal: int = 60, cal: str | None = None, cycle: int = 0,
          state: str | None = None, due: datetime | None = None, used: int = 0,
          breached_at: datetime | None = None) -> None:
    if state is None:
        state = "stopped" if outcome else "running"
    if state == "running" and due is None:
        due = FAR
    s.add(m.SlaClock(ticket_id=t.id, sla="std", target=target, cycle=cycle, calendar=cal,
                     goal_minutes=goal, state=state, started_at=start, used_seconds=used,
                     running_since=start if state == "running" else None, due_at=due,
                     stopped_at=stop, outcome=outcome, breached_at=breached_at))


def load_fixture(engine) -> None:  # type: ignore[no-untyped-def]
    with Session(engine) as s:
        t1 = add_ticket(s, 1, "support", 2, at(2, 10))
        clock(s, t1, "first_response", at(2, 10), outcome="met", stop=at(2, 10, 30), cal="office",
              used=1800)
        clock(s, t1, "solution", at(2, 10), outcome="met", stop=at(3, 10), goal=2880,
              used=79200)
        t2 = add_ticket(s, 2, "support", 2, at(2, 16))
        clock(s, t2, "first_response", at(2, 16), outcome="met", stop=at(3, 10), goal=120,
              cal="office", used=7200)
        clock(s, t2, "solution", at(2, 16), goal=2880)
        t3 = add_ticket(s, 3, "support", 3, at(3, 9))
        clock(s, t3, "first_response", at(3, 9), outcome="breached", stop=at(3, 11),
              breached_at=at(3, 10), used=7200)
        clock(s, t3, "update", at(3, 12), outcome="met", stop=at(3, 12, 20), cycle=1, used=1200)
        clock(s, t3, "update", at(3, 13), cycle=2, due=at(3, 14))
        clock(s, t3, "solution", at(3, 9), outcome="met", stop=at(4, 9), goal=2880, used=86400)
        t4 = add_ticket(s, 4, "support", 3, at(4, 12))
        clock(s, t4, "first_response", at(4, 12), outcome="met", stop=at(4, 12, 45),
              cal="office", used=2700)
        clock(s, t4, "solution", at(4, 12), outcome="cancelled", stop=at(4, 13), goal=2880)
        t5 = add_ticket(s, 5, "billing", 2, at(4, 18))
        clock(s, t5, "first_response", at(4, 18), outcome="met", stop=at(5, 9, 30),
              cal="office", used=1800)
        clock(s, t5, "solution", at(4, 18), outcome="breached", stop=at(6, 18), goal=480,
              cal="office", breached_at=at(5, 17), used=43200)
        t6 = add_ticket(s, 6, "billing", 3, at(5, 8))
        clock(s, t6, "first_response", at(5, 8), outcome="breached", stop=at(5, 12), goal=120,
              breached_at=at(5, 10), used=14400)
        clock(s, t6, "solution", at(5, 8), state="paused", used=4000)
        t7 = add_ticket(s, 7, "billing", 3, at(7, 10))
        clock(s, t7, "first_response", at(7, 10), cal="office")
        clock(s, t7, "solution", at(7, 10), goal=2880)
        add_ticket(s, 9, "support", 2, at(6, 9), sla=None)
        t10 = add_ticket(s, 10, "billing", 2, at(6, 10))
        clock(s, t10, "first_response", at(6, 10), due=at(6, 11), breached_at=at(6, 11))
        clock(s, t10, "solution", at(6, 10), goal=2880)
        t0 = add_ticket(s, 0, "support", 2, at(1, 23, 59, 59))
        clock(s, t0, "first_response", at(1, 23, 59, 59), outcome="met", stop=at(2, 0, 10),
              used=601)
        t8 = add_ticket(s, 8, "support", 2, at(9, 0))
        clock(s, t8, "first_response", at(9, 0), outcome="met", stop=at(9, 0, 10), used=600)
        s.commit()


@pytest.fixture
def rhome(home):  # type: ignore[no-untyped-def]
    home.update_config(calendars=[OFFICE])
    engine = home.engine()
    load_fixture(engine)
    engine.dispose()
    return home


def report_json(home, *args: str) -> dict:  # type: ignore[no-untyped-def]
    proc = home.cli("report", "sla", *RANGE, "--format", "json", *args, check=True)
    return json.loads(proc.stdout)


def t(count, met, breached, open_, cancelled, compliance, wall=None, business=None):  # type: ignore[no-untyped-def]
    """Expected stats of one target: wall/business = (measured, median, p90)."""
    wall = wall or (0, None, None)
    business = business or wall
    return {"count": count, "met": met, "breached": breached, "open": open_,
            "cancelled": cancelled, "compliance": compliance,
            "time": {"measured": wall[0], "median_seconds": wall[1], "p90_seconds": wall[2],
                     "measured_business": business[0], "median_business_seconds": business[1],
                     "p90_business_seconds": business[2]}}


NOTHING = t(0, 0, 0, 0, 0, None)

# Total. FR: T1 T2 T4 T5 met; T3 T6 T10 breached; T7 open -> 4/7 = 57.14 %.
#   wall  1800 2700 7200 14400 55800 64800: median (7200+14400)/2 = 10800, p90 rank 6 = 64800
#   busin 1800 1800 2700 7200 7200 14400:   median (2700+7200)/2 = 4950,  p90 rank 6 = 14400
# UPD: T3 #1 met (1200), #2 breached in progress -> 1/2 = 50 %.
# SOL: T1 T3 met; T5, T6 (paused over its goal) breached; T2 T7 T10 open; T4 cancelled
#   -> 2/4 = 50 %. wall 86400 86400 172800: median 86400, p90 rank ceil(2.7)=3 = 172800;
#   business (pauses excluded) 43200 79200 86400: median 79200, p90 86400.
TOTAL = {
    "tickets": 9, "tickets_with_sla": 8,  # T1-T7, T9, T10; T9 has no SLA
    "targets": {
        "first_response": t(8, 4, 3, 1, 0, 57.14, (6, 10800, 64800), (6, 4950, 14400)),
        "update": t(2, 1, 1, 0, 0, 50.0, (1, 1200, 1200)),
        "solution": t(8, 2, 2, 3, 1, 50.0, (3, 86400, 172800), (3, 79200, 86400)),
    },
}
BY_QUEUE = [
    # billing: T5 T6 T7 T10. FR: T5 met, T6 T10 breached, T7 open -> 1/3 = 33.33 %;
    #   wall 14400 55800 -> median 35100, p90 rank 2 = 55800; business 1800 14400 -> 8100, 14400.
    #   SOL: T5 T6 breached, T7 T10 open -> 0 %; only T5 measured: 172800 / business 43200.
    {"queue": "billing", "tickets": 4, "tickets_with_sla": 4, "targets": {
        "first_response": t(4, 1, 2, 1, 0, 33.33, (2, 35100, 55800), (2, 8100, 14400)),
        "update": NOTHING,
        "solution": t(4, 0, 2, 2, 0, 0.0, (1, 172800, 172800), (1, 43200, 43200)),
    }},
    # support: T1 T2 T3 T4 T9. FR: T1 T2 T4 met, T3 breached -> 75 %;
    #   wall 1800 2700 7200 64800 -> median 4950, p90 rank ceil(3.6)=4 = 64800;
    #   business 1800 2700 7200 7200 -> median 4950, p90 7200.
    #   SOL: T1 T3 met, T2 open, T4 cancelled -> 100 %; wall 86400 86400; business 79200
    #   86400 -> median 82800, p90 rank 2 = 86400.
    {"queue": "support", "tickets": 5, "tickets_with_sla": 4, "targets": {
        "first_response": t(4, 3, 1, 0, 0, 75.0, (4, 4950, 64800), (4, 4950, 7200)),
        "update": t(2, 1, 1, 0, 0, 50.0, (1, 1200, 1200)),
        "solution": t(4, 2, 0, 1, 1, 100.0, (2, 86400, 86400), (2, 82800, 86400)),
    }},
]
BY_PRIORITY = [
    # 2: T1 T2 T5 T9 T10. FR: T1 T2 T5 met, T10 breached -> 75 %;
    #   wall 1800 55800 64800 -> median 55800, p90 64800; business 1800 1800 7200 -> 1800, 7200.
    #   SOL: T1 met, T5 breached, T2 T10 open -> 50 %; wall 86400 172800 -> median 129600,
    #   p90 172800; business 43200 79200 -> 61200, 79200.
    {"priority": 2, "tickets": 5, "tickets_with_sla": 4, "targets": {
        "first_response": t(4, 3, 1, 0, 0, 75.0, (3, 55800, 64800), (3, 1800, 7200)),
        "update": NOTHING,
        "solution": t(4, 1, 1, 2, 0, 50.0, (2, 129600, 172800), (2, 61200, 79200)),
    }},
    # 3: T3 T4 T6 T7. FR: T4 met, T3 T6 breached, T7 open -> 33.33 %; 2700 7200 14400 (same in
    #   business time) -> median 7200, p90 14400. SOL: T3 met, T6 breached, T7 open, T4
    #   cancelled -> 50 %; 86400.
    {"priority": 3, "tickets": 4, "tickets_with_sla": 4, "targets": {
        "first_response": t(4, 1, 2, 1, 0, 33.33, (3, 7200, 14400)),
        "update": t(2, 1, 1, 0, 0, 50.0, (1, 1200, 1200)),
        "solution": t(4, 1, 1, 1, 1, 50.0, (1, 86400, 86400)),
    }},
]


def test_json_numbers_match_the_hand_computed_fixture(rhome):
    r = report_json(rhome)
    assert r["report"] == "sla" and r["version"] == 1
    assert r["range"] == {"from": "2026-11-02T00:00:00+00:00", "to": "2026-11-09T00:00:00+00:00",
                          "timezone": "UTC"}
    assert r["queues"] is None
    assert r["targets"] == ["first_response", "update", "solution"]
    assert r["total"] == TOTAL
    assert r["by_queue"] == BY_QUEUE
    assert r["by_priority"] == BY_PRIORITY
    assert r["warnings"] == []
    # Compliance per day of creation, decided clocks only:
    #   Mon 02: T1 FR, T1 SOL, T2 FR met                          -> 3/3   100 %
    #   Tue 03: T3 UPD#1 and SOL met; FR and UPD#2 breached       -> 2/4   50 %
    #   Wed 04: T4 FR, T5 FR met; T5 SOL breached                 -> 2/3   66.67 %
    #   Thu 05: T6 FR and SOL breached                            -> 0/2   0 %
    #   Fri 06: T10 FR breached (T9 has no clocks)                -> 0/1   0 %
    #   Sat 07, Sun 08: nothing decided                           -> None
    s = r["series"]
    assert s["period"] == "day"
    got = [(p["start"], p["met"], p["breached"], p["compliance"]) for p in s["points"]]
    assert got == [("2026-11-02", 3, 0, 100.0), ("2026-11-03", 2, 2, 50.0),
                   ("2026-11-04", 2, 1, 66.67), ("2026-11-05", 0, 2, 0.0),
                   ("2026-11-06", 0, 1, 0.0), ("2026-11-07", 0, 0, None),
                   ("2026-11-08", 0, 0, None)]
    assert s["points"][1]["targets"] == {
        "first_response": {"met": 0, "breached": 1, "compliance": 0.0},
        "update": {"met": 1, "breached": 1, "compliance": 50.0},
        "solution": {"met": 1, "breached": 0, "compliance": 100.0}}


def _keys(value, out: set[str]) -> set[str]:  # type: ignore[no-untyped-def]
    if isinstance(value, dict):
        for k, v in value.items():
            if k not in ("first_response", "update", "solution"):
                out.add(k)
            _keys(v, out)
    elif isinstance(value, list):
        for v in value:
            _keys(v, out)
    return out


def test_json_follows_its_schema_and_docs(rhome):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    from pathlib import Path

    import mailgw.sla.report as report_mod

    schema = json.loads((Path(report_mod.__file__).parent / "report.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    r = report_json(rhome)
    jsonschema.validate(r, schema)
    assert sorted(schema["required"]) == sorted(r)
    broken = json.loads(json.dumps(r))
    broken["total"]["targets"]["update"]["met"] = -1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    # Every key an admin can meet is documented (docs/reports.md names it in backquotes).
    docs = (Path(__file__).parent.parent / "docs" / "reports.md").read_text()
    assert sorted(k for k in _keys(r, set()) if f"`{k}`" not in docs) == []


def test_weeks_and_time_zone(rhome):
    # One ISO week: met FR 4 + UPD 1 + SOL 2 = 7, breached 3 + 1 + 2 = 6 -> 7/13 = 53.85 %.
    r = report_json(rhome, "--period", "week")
    assert [(p["start"], p["met"], p["breached"], p["compliance"])
            for p in r["series"]["points"]] == [("2026-11-02", 7, 6, 53.85)]
    # In Europe/Berlin (UTC+1) the range starts at Sun 01 23:00 UTC: T0 (23:59:59) is in, T8
    # (Mon 09 00:00 UTC = 01:00 local) is still out. T0's FR is met in 10 min 1 s.
    r = report_json(rhome, "--tz", "Europe/Berlin")
    assert r["range"]["from"] == "2026-11-02T00:00:00+01:00"
    assert r["total"]["tickets"] == 10
    fr = r["total"]["targets"]["first_response"]
    assert (fr["count"], fr["met"], fr["compliance"]) == (9, 5, 62.5)  # 5/8
    assert fr["time"]["measured"] == 7


def test_csv_and_table_show_the_same_numbers(rhome):
    r = report_json(rhome)
    out = rhome.cli("report", "sla", *RANGE, "--format", "csv", check=True).stdout.decode()
    rows = list(csv.DictReader(io.StringIO(out)))
    # 3 targets x (total + 2 queues + 2 priorities)
    assert len(rows) == 15
    by_key = {(x["scope"], x["group"], x["target"]): x for x in rows}
    fr = by_key[("total", "all", "first_response")]
    assert (fr["tickets"], fr["count"], fr["met"], fr["breached"], fr["open"],
            fr["compliance_pct"], fr["median_seconds"], fr["p90_seconds"],
            fr["median_business_seconds"], fr["p90_business_seconds"]) == (
        "9", "8", "4", "3", "1", "57.14", "10800", "64800", "4950", "14400")
    assert by_key[("queue", "billing", "update")]["compliance_pct"] == ""
    # Every CSV row carries exactly the JSON's numbers.
    groups = [("total", "all", r["total"])] + [("queue", g["queue"], g) for g in r["by_queue"]] + [
        ("priority", str(g["priority"]), g) for g in r["by_priority"]]
    for scope, name, g in groups:
        for target, exp in g["targets"].items():
            row = by_key[(scope, name, target)]
            assert int(row["count"]) == exp["count"] and int(row["met"]) == exp["met"]
            assert int(row["breached"]) == exp["breached"] and int(row["open"]) == exp["open"]
            assert (float(row["compliance_pct"]) if row["compliance_pct"] else None) == (
                exp["compliance"])
            for k, v in exp["time"].items():
                assert (float(row[k]) if row[k] else None) == v, (scope, name, target, k)

    table = rhome.cli("report", "sla", *RANGE, check=True).stdout.decode()
    lines = [ln.split() for ln in table.splitlines()]
    # 10800 s = 3h00m, 64800 = 18h00m, 4950 = 1h22m(30s), 14400 = 4h00m.
    assert ["total", "first_response", "8", "4", "3", "1", "0", "57.14", "3h00m", "18h00m", "1h22m",
            "4h00m"] in lines
    # billing: 35100 = 9h45m, 55800 = 15h30m, 8100 = 2h15m; 172800 = 2d00h, 43200 = 12h00m.
    assert ["queue", "billing", "first_response", "4", "1", "2", "1", "0", "33.33", "9h45m", "15h30m",
            "2h15m", "4h00m"] in lines
    assert ["solution", "4", "0", "2", "2", "0", "0.00", "2d00h", "2d00h", "12h00m",
            "12h00m"] in lines
    # support's solution: T4 cancelled, the column after OPEN; business 82800 = 23h00m.
    assert ["solution", "4", "2", "0", "1", "1", "100.00", "1d00h", "1d00h", "23h00m",
            "1d00h"] in lines
    assert ["update", "0", "0", "0", "0", "0", "-", "-", "-", "-", "-"] in lines
    assert "9 tickets, 8 with an SLA" in table


class _Checker(HTMLParser):
    """Tags must nest and close (void elements excepted); collects tags and attributes."""

    VOID = {"meta", "br", "hr", "img", "input", "link"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):  # type: ignore[no-untyped-def]
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):  # type: ignore[no-untyped-def]
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def test_html_is_self_contained_with_both_charts(rhome, tmp_path):
    out = tmp_path / "report.html"
    proc = rhome.cli("report", "sla", *RANGE, "--format", "html", "--output", str(out))
    assert proc.returncode == 0, proc.stderr.decode()
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>")
    checker = _Checker()
    checker.feed(html)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    svgs = [a["id"] for tag, a in checker.tags if tag == "svg"]
    assert svgs == ["compliance-chart", "breaches-chart"]
    # No script, nothing fetched: no src/href attributes at all.
    assert not [tag for tag, a in checker.tags if tag == "script" or "src" in a or "href" in a]
    # Each chart is well-formed SVG (XML).
    charts = {}
    for name in svgs:
        start = html.index(f'<svg id="{name}"')
        charts[name] = ET.fromstring(html[start:html.index("</svg>", start) + len("</svg>")])
    ns = "{http://www.w3.org/2000/svg}"
    # Compliance: a series per target with something decided, plus "all"; 5 decided days.
    groups = {g.get("data-target"): g for g in charts["compliance-chart"].iter(f"{ns}g")}
    assert set(groups) == {"first_response", "update", "solution", "all"}
    assert len(groups["all"].findall(f"{ns}circle")) == 5
    # Breaches: billing FR 2 + SOL 2, support FR 1 + UPD 1 -> 4 stacked parts, totals 4 and 2.
    bars = {g.get("data-queue"): g for g in charts["breaches-chart"].iter(f"{ns}g")}
    assert set(bars) == {"billing", "support"}
    assert len(bars["billing"].findall(f"{ns}rect")) == 2
    assert len(bars["support"].findall(f"{ns}rect")) == 2
    assert [x.text for x in bars["billing"].findall(f"{ns}text")] == ["4", "billing"]
    assert [x.text for x in bars["support"].findall(f"{ns}text")] == ["2", "support"]
    # The two billing parts are proportional to their counts (2 and 2 of a scale topped at 4+).
    heights = [float(x.get("height")) for x in bars["billing"].findall(f"{ns}rect")]
    assert heights[0] == heights[1] > 0


def test_queue_filter(rhome):
    r = report_json(rhome, "--queue", "billing")
    assert r["queues"] == ["billing"]
    assert r["by_queue"] == [BY_QUEUE[0]]
    assert r["total"] == {k: v for k, v in BY_QUEUE[0].items() if k != "queue"}
    # Priority 3 of billing alone: T6 T7. FR: T6 breached, T7 open -> 0 %.
    p3 = next(g for g in r["by_priority"] if g["priority"] == 3)
    assert p3["tickets"] == 2
    assert p3["targets"]["first_response"] == t(2, 0, 1, 1, 0, 0.0, (1, 14400, 14400))


def test_empty_range(rhome, tmp_path):
    r = json.loads(rhome.cli(
        "report", "sla", "--from", "2025-01-01", "--to", "2025-01-02", "--format", "json",
        check=True).stdout)
    assert r["total"] == {"tickets": 0, "tickets_with_sla": 0,
                          "targets": {k: NOTHING for k in ("first_response", "update",
                                                           "solution")}}
    assert r["by_queue"] == [] and r["by_priority"] == []
    assert r["series"]["points"] == [{"start": "2025-01-01", "met": 0, "breached": 0,
                                      "compliance": None, "targets": {
        k: {"met": 0, "breached": 0, "compliance": None}
        for k in ("first_response", "update", "solution")}}]
    for fmt in ("table", "csv", "html"):
        proc = rhome.cli("report", "sla", "--from", "2025-01-01", "--to", "2025-01-02",
                         "--format", fmt)
        assert proc.returncode == 0, proc.stderr.decode()
    assert b"no breaches in this range" in proc.stdout


@pytest.mark.parametrize(("args", "message"), [
    (("--from", "2026-13-01", "--to", "2026-12-01"), "--from: '2026-13-01' is not a date"),
    (("--from", "2026-11-01", "--to", "tomorrow"), "--to: 'tomorrow' is not a date"),
    (("--from", "2026-11-09", "--to", "2026-11-02"), "is not after --from"),
    (("--from", "2026-11-01", "--to", "2026-11-01"), "the range [from, to) is empty"),
    (("--from", "2026-11-01", "--to", "2026-12-01", "--tz", "Mars/Olympus"),
     "unknown time zone 'Mars/Olympus'"),
    (("--from", "2026-11-01"), "Missing option '--to'"),
    (("--from", "2026-11-01", "--to", "2026-12-01", "--format", "pdf"), "'pdf' is not one of"),
])
def test_bad_arguments_exit_2(tmp_path, args, message):
    from mailgw.home import init_home

    init_home(tmp_path / "home")
    proc = subprocess.run([sys.executable, "-m", "mailgw", "--home", str(tmp_path / "home"),
                           "report", "sla", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert proc.stdout == ""


def test_store_error_exits_1(tmp_path):
    from mailgw.home import init_home
    from tests.conftest import free_port

    init_home(tmp_path / "home")
    env = {**os.environ, "MAILGW_STORE_URL":
           f"postgresql+psycopg://nobody:secret@127.0.0.1:{free_port()}/none?connect_timeout=3"}
    proc = subprocess.run([sys.executable, "-m", "mailgw", "--home", str(tmp_path / "home"),
                           "report", "sla", "--from", "2026-11-01", "--to", "2026-12-01"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1, proc.stderr
    assert "mailgw report sla: store error (postgresql+psycopg://nobody:***@" in proc.stderr
    assert "secret" not in proc.stderr
    assert "OperationalError" in proc.stderr


def test_html_escapes_queue_names_and_business_time_needs_no_calendar(home):
    engine = home.engine()
    with Session(engine) as s:
        tk = add_ticket(s, 1, "x<script>alert(1)</script>", 3, at(2, 10))
        # 2 h between start and stop, 30 min of it paused, in a calendar removed since
        clock(s, tk, "first_response", at(2, 10), outcome="breached", stop=at(2, 12),
              cal="gone", used=5400)
        s.commit()
    settings = home.settings()
    with Session(engine) as s:
        r = build_report(s, settings, start=at(2, 0), end=at(3, 0))
    engine.dispose()
    fr = r["total"]["targets"]["first_response"]
    # The business time is what the clock counted, whatever the configuration says now.
    assert fr["time"]["measured"] == 1 and fr["time"]["median_seconds"] == 7200
    assert (fr["time"]["measured_business"], fr["time"]["median_business_seconds"]) == (1, 5400)
    assert r["warnings"] == []
    html = to_html(r)
    assert "<script>" not in html
    assert "x&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_median_and_nearest_rank_p90():
    assert median([]) is None and p90([]) is None
    assert median([5]) == 5 and p90([5]) == 5
    assert median([4, 1, 3, 2]) == 2.5
    # 10 values: rank ceil(9.0) = 9 -> 9; 11 values: rank ceil(9.9) = 10 -> 10.
    assert p90(list(range(1, 11))) == 9
    assert p90(list(range(1, 12))) == 10
    assert p90([30, 10, 20]) == 30  # rank ceil(2.7) = 3


def test_dates_are_read_in_the_report_zone():
    from zoneinfo import ZoneInfo

    from mailgw.sla.report import ReportError, parse_when

    berlin = ZoneInfo("Europe/Berlin")
    # A date is local midnight: CET (UTC+1) in November, CEST (UTC+2) in July.
    assert parse_when("2026-11-02", berlin, option="--from") == datetime(2026, 11, 1, 23,
                                                                          tzinfo=UTC)
    assert parse_when("2026-07-01", berlin, option="--from") == datetime(2026, 6, 30, 22,
                                                                          tzinfo=UTC)
    # A date-time without an offset is local too; one with an offset keeps it.
    assert parse_when("2026-11-02T08:30", berlin, option="--to") == at(2, 7, 30)
    assert parse_when("2026-11-02T08:30-05:00", berlin, option="--to") == at(2, 13, 30)
    with pytest.raises(ReportError, match="--to: '02.11.2026' is not a date"):
        parse_when("02.11.2026", berlin, option="--to")


def test_business_time_is_the_sla_counted_time_of_the_engine(store_url, tmp_path):
    """Clocks written by the SLA engine itself (mailgw/sla/clocks.py), not by hand: a pending
    span is not business time. Office Europe/Berlin Mon-Fri 09:00-18:00 (tests/
    test_sla_clocks.py): opened Fri 17:55, pending Mon 09:10-14:00, answered Mon 15:00.
    First response: 5 min Fri + 10 Mon + 60 Mon = 75 min counted; the wall time is 69 h 5 min
    (the working time between start and stop, the old measure, would be 365 min)."""
    from mailgw.settings import Settings
    from mailgw.store.db import make_engine, migrate
    from tests.test_sla_clocks import (
        CONFIG,
        FRI_1755,
        agent_answers,
        berlin,
        open_ticket,
        set_state,
    )

    st = Settings.model_validate(CONFIG)
    (tmp_path / "store").mkdir(exist_ok=True)
    engine = make_engine(store_url)
    migrate(engine)
    try:
        with Session(engine) as s, s.begin():
            tk = open_ticket(s, st, FRI_1755)
            set_state(s, st, tk, "pending", berlin(2026, 11, 30, 9, 10))
            set_state(s, st, tk, "open", berlin(2026, 11, 30, 14, 0))
            agent_answers(s, st, tk, berlin(2026, 11, 30, 15, 0))
            set_state(s, st, tk, "closed", berlin(2026, 11, 30, 16, 0))
        with Session(engine) as s:
            r = build_report(s, st, start=at(27, 0), end=at(28, 0),
                             as_of=berlin(2026, 12, 1, 0, 0))
    finally:
        engine.dispose()
    fr = r["total"]["targets"]["first_response"]
    assert (fr["met"], fr["breached"]) == (0, 1)  # due Mon 14:45
    assert fr["time"]["median_seconds"] == 69 * 3600 + 5 * 60
    assert fr["time"]["median_business_seconds"] == 75 * 60
    # solution: the same 15 + 120 min (closed at 16:00), met within its 960
    sol = r["total"]["targets"]["solution"]
    assert (sol["met"], sol["time"]["median_business_seconds"]) == (1, 135 * 60)


def test_sub_second_instants_and_local_midnight(home):
    """Durations are exact to the microsecond and a ticket created a moment before local
    midnight counts for its day, on both stores (SQLite keeps instants as text and rounds
    fractions to milliseconds in its date functions: .9999 s must not become a second)."""
    from datetime import timedelta

    engine = home.engine()
    with Session(engine) as s:
        # 22:59:59.9999 UTC = 23:59:59.9999 in Europe/Berlin, still Monday 2 November
        created = at(2, 22, 59, 59) + timedelta(microseconds=999_900)
        tk = add_ticket(s, 1, "support", 3, created)
        clock(s, tk, "first_response", created, outcome="met",
              stop=created + timedelta(seconds=1, microseconds=100), used=1)
        s.commit()
    with Session(engine) as s:
        r = build_report(s, home.settings(), start=at(1, 23), end=at(3, 23), tz="Europe/Berlin")
    engine.dispose()
    fr = r["total"]["targets"]["first_response"]
    # 1.0001 s -> 1.0 (the report rounds to milliseconds); 2.0 if a fraction were rounded up
    assert fr["time"]["median_seconds"] == 1.0
    assert [(p["start"], p["met"]) for p in r["series"]["points"]] == [
        ("2026-11-02", 1), ("2026-11-03", 0)]


def test_days_of_a_zone_with_a_half_hour_offset(home):
    """Asia/Kolkata is UTC+5:30: its days start at 18:30 UTC, so the report counts in spans
    of 30 minutes (SQLite: by its date functions, not the hour of the stored text)."""
    from datetime import timedelta

    engine = home.engine()
    with Session(engine) as s:
        # 23:59:59.9999 on Monday 2 November in Kolkata, then its midnight
        for n, created in enumerate((at(2, 18, 29, 59) + timedelta(microseconds=999_900),
                                     at(2, 18, 30), at(2, 18, 59))):
            tk = add_ticket(s, n, "support", 3, created)
            clock(s, tk, "first_response", created, outcome="met",
                  stop=created + timedelta(minutes=5), used=300)
        s.commit()
    with Session(engine) as s:
        r = build_report(s, home.settings(), start=at(1, 18, 30), end=at(3, 18, 30),
                         tz="Asia/Kolkata")
    engine.dispose()
    assert [(p["start"], p["met"]) for p in r["series"]["points"]] == [
        ("2026-11-02", 1), ("2026-11-03", 2)]
