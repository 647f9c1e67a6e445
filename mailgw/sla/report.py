"""SLA reports (issue 6): ``mailgw report sla``. Reads the clocks sla-core writes; writes nothing.

Everything is aggregated in SQL (``build_report``: four grouped queries); only the medians
and nearest-rank p90s are computed here, over the durations each group hands back as one
text of integers (calendar time in microseconds, SLA-counted business seconds): a few
dozen bytes per decided clock, no Python object per row. The durations are integers on
both stores, so the numbers are the same on SQLite and PostgreSQL. Definitions and the
JSON contract: docs/reports.md.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    and_,
    case,
    cast,
    extract,
    func,
    literal,
    or_,
    select,
)

from mailgw.store.models import SlaClock, Ticket

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from mailgw.settings import Settings

TARGETS = ("first_response", "update", "solution")
STATUSES = ("met", "breached", "open", "cancelled")
REPORT_VERSION = 1
# Above this many days a range is charted per ISO week rather than per day.
AUTO_DAY_LIMIT = 62


class ReportError(ValueError):
    """A bad argument (a date, a time zone): the CLI turns it into a usage error."""


def parse_when(text: str, zone: ZoneInfo, *, option: str) -> datetime:
    """``2026-11-01`` (midnight in ``zone``) or an ISO 8601 date-time (without an offset: in
    ``zone``) -> an aware UTC datetime."""
    raw = text.strip()
    try:
        if len(raw) == 10:
            moment = datetime.combine(date.fromisoformat(raw), time(0), zone)
        else:
            moment = datetime.fromisoformat(raw)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=zone)
    except ValueError:
        raise ReportError(f"{option}: {text!r} is not a date (YYYY-MM-DD) or an ISO 8601 "
                          "date-time (YYYY-MM-DDTHH:MM[:SS][+HH:MM])") from None
    return moment.astimezone(UTC)


def _utc(dt: datetime | None) -> datetime | None:
    # Everything is stored in UTC; SQLite hands datetimes back without their zone.
    if dt is None:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def median(values: Sequence[float]) -> float | None:
    """The middle value; for an even count the mean of the two middle values."""
    return float(statistics.median(values)) if values else None


def p90(values: Sequence[float]) -> float | None:
    """Nearest-rank 90th percentile: the smallest value with at least 90 % of the values at or
    below it (the ``ceil(0.9 * n)``-th smallest). Always one of the measured values."""
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[math.ceil(0.9 * len(ordered)) - 1])


def _median_sorted(ordered: Sequence[float]) -> float | None:
    n = len(ordered)
    if not n:
        return None
    mid = n // 2
    return float(ordered[mid]) if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _p90_sorted(ordered: Sequence[float]) -> float | None:
    return float(ordered[math.ceil(0.9 * len(ordered)) - 1]) if ordered else None


def compliance(met: int, breached: int) -> float | None:
    """met / (met + breached) in percent, two decimals; None when nothing is decided."""
    decided = met + breached
    return round(100 * met / decided, 2) if decided else None


@dataclass
class _Target:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    # the durations, in parts (one per queue and priority): joined and sorted once
    wall: list[list[float]] = field(default_factory=list)
    business: list[list[float]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        c = self.counts
        wall = sorted(chain.from_iterable(self.wall))
        business = sorted(chain.from_iterable(self.business))
        return {
            "count": sum(c.values()), **c,
            "compliance": compliance(c["met"], c["breached"]),
            "time": {
                "measured": len(wall),
                "median_seconds": _round(_median_sorted(wall)),
                "p90_seconds": _round(_p90_sorted(wall)),
                "measured_business": len(business),
                "median_business_seconds": _round(_median_sorted(business)),
                "p90_business_seconds": _round(_p90_sorted(business)),
            },
        }


@dataclass
class _Group:
    tickets: int = 0
    tickets_with_sla: int = 0
    targets: dict[str, _Target] = field(default_factory=lambda: {t: _Target() for t in TARGETS})

    def as_json(self) -> dict[str, Any]:
        return {"tickets": self.tickets, "tickets_with_sla": self.tickets_with_sla,
                "targets": {t: v.as_json() for t, v in self.targets.items()}}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _status_column(as_of: datetime):  # type: ignore[no-untyped-def]
    """met / breached / open / cancelled. An undecided clock already past its goal (the sweep
    marked it, its due time has passed, or it was paused with the goal used up) can no longer
    be met: it counts as breached."""
    over = or_(SlaClock.breached_at.is_not(None),
               and_(SlaClock.due_at.is_not(None), SlaClock.due_at <= as_of),
               SlaClock.used_seconds >= SlaClock.goal_minutes * 60)
    return case((SlaClock.outcome.in_(("met", "breached", "cancelled")), SlaClock.outcome),
                (over, literal("breached")), else_=literal("open")).label("status")


def _epoch_seconds(dialect: str, column):  # type: ignore[no-untyped-def]
    """Whole seconds since 1970 of a stored UTC instant, as an integer, in SQL. SQLite:
    without the fraction, which its date functions round to milliseconds (.9995 s would
    become the next second)."""
    if dialect == "sqlite":
        return cast(func.strftime("%s", func.substr(column, 1, 19)), Integer)
    return cast(func.floor(func.date_part("epoch", column)), BigInteger)


def _bucket(dialect: str, column, bounds: list[int]):  # type: ignore[no-untyped-def]
    """A key of the UTC span a stored instant lies in, in SQL, and a function from a key to
    the span's first second. Every span lies within one period of the report (a day or a
    week of its zone): its width divides 86400 and every period's start (``bounds``, UTC
    seconds), e.g. 86400 s in UTC, 3600 s in Europe/Berlin, 1800 s in Asia/Kolkata. On
    SQLite an hour's span is the first 13 characters of the stored text, far cheaper than
    its date functions."""
    width = math.gcd(86400, *bounds)
    if dialect == "sqlite" and width % 3600 == 0:
        def hour(key: str) -> int:
            return int(datetime.fromisoformat(f"{key}:00:00+00:00").timestamp())
        return func.substr(column, 1, 13), hour
    return _epoch_seconds(dialect, column) // width, lambda key: int(key) * width


def _micros_between(dialect: str, start, stop):  # type: ignore[no-untyped-def]
    """``stop - start`` in whole microseconds, exact, in SQL (never below 0). SQLite keeps
    instants as text (``2026-11-02 10:00:00.123456``): whole seconds by ``strftime('%s')``,
    the fraction from the text, padded, so a shorter fraction still reads right."""
    if dialect == "sqlite":
        def frac(c):  # type: ignore[no-untyped-def]
            return cast(func.substr(func.substr(c, 21).op("||")(literal("000000")), 1, 6),
                        Integer)
        def whole(c):  # type: ignore[no-untyped-def]
            # without the fraction: SQLite rounds it to milliseconds, .9995 s to the next second
            return func.julianday(func.substr(c, 1, 19))
        # whole seconds apart: within 1e-4 s of an integer as a double, so round() is exact;
        # julianday() is cheaper than strftime('%s') and older than unixepoch()
        secs = cast(func.round((whole(stop) - whole(start)) * 86400), Integer)
        us = secs * 1_000_000 + frac(stop) - frac(start)
        return func.max(0, us)
    us = cast(extract("epoch", stop - start) * 1_000_000, BigInteger)
    return func.greatest(0, us)


def _concat(dialect: str, column):  # type: ignore[no-untyped-def]
    """The values of an integer column of a group as one comma-separated text."""
    if dialect == "sqlite":
        return func.group_concat(column, literal(","))
    return func.string_agg(cast(column, String), literal(","))


def _ints(text: str | None) -> list[int]:
    return list(map(int, text.split(","))) if text else []


def _period_starts(period: str, first: date, last: date) -> list[date]:
    """The first day of every period (day, or the Monday of an ISO week) of the range."""
    day = first - timedelta(days=first.weekday()) if period == "week" else first
    step = timedelta(days=7 if period == "week" else 1)
    out = []
    while day <= last:
        out.append(day)
        day += step
    return out


def build_report(session: Session, settings: Settings, *, start: datetime, end: datetime,
                 tz: str = "UTC", queues: Iterable[str] = (), as_of: datetime | None = None,
                 period: str = "auto") -> dict[str, Any]:
    """The SLA report of the tickets created in [start, end) as the JSON-ready dict that
    docs/reports.md describes. ``as_of`` (default now) decides which undecided clocks are
    already past due.

    Four aggregating queries over the range's tickets and clocks, no row per clock in
    Python: tickets per queue and priority; clocks per queue, priority, target and status;
    the durations of the decided clocks per queue, priority and target as one text of
    integers each (group_concat / string_agg: wall-clock microseconds and SLA-counted
    seconds); decided clocks per target, status and creation bucket for the series (a
    bucket is a span of UTC seconds that lies within one local day of the report's zone)."""
    zone = ZoneInfo(tz)
    as_of = _utc(as_of) or datetime.now(UTC)
    queues = sorted(set(queues))
    if period == "auto":
        period = "day" if (end - start) <= timedelta(days=AUTO_DAY_LIMIT) else "week"
    if period not in ("day", "week"):
        raise ReportError(f"period must be day, week or auto, not {period!r}")
    dialect = session.get_bind().dialect.name

    in_range = [Ticket.created_at >= start, Ticket.created_at < end]
    if queues:
        in_range.append(Ticket.queue.in_(queues))

    total = _Group()
    by_queue: dict[str, _Group] = defaultdict(_Group)
    by_priority: dict[int, _Group] = defaultdict(_Group)

    def groups(queue: str, priority: int) -> tuple[_Group, _Group, _Group]:
        return total, by_queue[queue], by_priority[priority]

    # Tickets per queue and priority (with and without an SLA).
    q = (select(Ticket.queue, Ticket.priority, func.count(), func.count(Ticket.sla))
         .where(*in_range).group_by(Ticket.queue, Ticket.priority))
    for queue, priority, n, n_sla in session.execute(q):
        for g in groups(queue, priority):
            g.tickets += n
            g.tickets_with_sla += n_sla

    first = start.astimezone(zone).date()
    last = (end - timedelta(microseconds=1)).astimezone(zone).date()
    starts = _period_starts(period, first, last)
    bounds = [int(datetime.combine(d, time(0), zone).timestamp()) for d in starts]
    bucket, to_epoch = _bucket(dialect, Ticket.created_at, bounds)
    # The status is computed in a subquery so PostgreSQL groups by a column, not by a CASE
    # with bound parameters.
    clocks = (select(Ticket.queue, Ticket.priority, SlaClock.target, SlaClock.outcome,
                     SlaClock.used_seconds, SlaClock.started_at, SlaClock.stopped_at,
                     bucket.label("bucket"), _status_column(as_of))
              .join(SlaClock, SlaClock.ticket_id == Ticket.id).where(*in_range).subquery())

    # One pass: clocks per queue, priority, target and status, and the durations of the
    # stopped, decided ones (group_concat / string_agg skip the NULLs of the others):
    # calendar time (stop - start, exact to the microsecond on both stores) and business
    # time (the SLA-counted time of the clock's ledger, pauses excluded: used_seconds).
    decided = and_(clocks.c.outcome.in_(("met", "breached")), clocks.c.stopped_at.is_not(None),
                   clocks.c.started_at.is_not(None))
    wall_us = case((decided, _micros_between(dialect, clocks.c.started_at, clocks.c.stopped_at)))
    used = case((decided, func.coalesce(clocks.c.used_seconds, 0)))
    q = (select(clocks.c.queue, clocks.c.priority, clocks.c.target, clocks.c.status,
                func.count(), _concat(dialect, wall_us), _concat(dialect, used))
         .group_by(clocks.c.queue, clocks.c.priority, clocks.c.target, clocks.c.status))
    for queue, priority, target, status, n, walls, useds in session.execute(q):
        if target not in TARGETS:
            continue
        wall = [u / 1e6 for u in _ints(walls)]
        business = [float(u) for u in _ints(useds)]
        for g in groups(queue, priority):
            g.targets[target].counts[status] += n
            if wall:
                g.targets[target].wall.append(wall)
                g.targets[target].business.append(business)

    # Compliance over time: decided clocks (stopped or already past their goal) per target,
    # status and bucket of creation; each bucket lies within one day (or week) of the zone.
    series: dict[date, dict[str, list[int]]] = defaultdict(
        lambda: {t: [0, 0] for t in TARGETS})
    q = (select(clocks.c.target, clocks.c.status, clocks.c.bucket, func.count())
         .where(clocks.c.status.in_(("met", "breached")))
         .group_by(clocks.c.target, clocks.c.status, clocks.c.bucket))
    for target, status, k, n in session.execute(q):
        if target not in TARGETS:
            continue
        i = bisect_right(bounds, to_epoch(k)) - 1
        if i < 0:
            continue  # cannot happen: the first period starts before the range
        series[starts[i]][target][0 if status == "met" else 1] += n

    return {
        "report": "sla",
        "version": REPORT_VERSION,
        "generated_at": datetime.now(UTC).isoformat(),
        "as_of": as_of.isoformat(),
        "range": {"from": start.astimezone(zone).isoformat(), "to": end.astimezone(zone).isoformat(),
                  "timezone": tz},
        "queues": queues or None,
        "targets": list(TARGETS),
        "total": total.as_json(),
        "by_queue": [{"queue": k, **by_queue[k].as_json()} for k in sorted(by_queue)],
        "by_priority": [{"priority": k, **by_priority[k].as_json()} for k in sorted(by_priority)],
        "series": _series(series, period, first, last),
        "warnings": [],
    }


def _series(data: dict[date, dict[str, list[int]]], period: str, first: date,
            last: date) -> dict[str, Any]:
    """Compliance per day or ISO week (by the ticket's creation), every period of the range,
    empty ones included (compliance None)."""
    step = timedelta(days=7 if period == "week" else 1)
    day = first - timedelta(days=first.weekday()) if period == "week" else first
    points = []
    while day <= last:
        per = data.get(day, {t: [0, 0] for t in TARGETS})
        met = sum(v[0] for v in per.values())
        breached = sum(v[1] for v in per.values())
        points.append({
            "start": day.isoformat(), "met": met, "breached": breached,
            "compliance": compliance(met, breached),
            "targets": {t: {"met": m_, "breached": b, "compliance": compliance(m_, b)}
                        for t, (m_, b) in per.items()},
        })
        day += step
    return {"period": period, "points": points}


# --- output formats -------------------------------------------------------------------------

CSV_COLUMNS = ("scope", "group", "target", "tickets", "tickets_with_sla", "count", "met",
               "breached", "open", "cancelled", "compliance_pct", "measured", "median_seconds",
               "p90_seconds", "measured_business", "median_business_seconds",
               "p90_business_seconds")


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per (scope, group, target): the rows of the CSV and the table."""
    scoped = [("total", "all", report["total"])]
    scoped += [("queue", g["queue"], g) for g in report["by_queue"]]
    scoped += [("priority", str(g["priority"]), g) for g in report["by_priority"]]
    out = []
    for scope, name, g in scoped:
        for target, t in g["targets"].items():
            out.append({
                "scope": scope, "group": name, "target": target, "tickets": g["tickets"],
                "tickets_with_sla": g["tickets_with_sla"], "count": t["count"], "met": t["met"],
                "breached": t["breached"], "open": t["open"], "cancelled": t["cancelled"],
                "compliance_pct": t["compliance"], **t["time"]})
    return out


def to_csv(report: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows(report):
        w.writerow({k: ("" if r[k] is None else _plain(r[k])) for k in CSV_COLUMNS})
    return buf.getvalue()


def _plain(v: Any) -> Any:
    # 3600.0 -> 3600, so the CSV reads as the JSON does for whole seconds.
    return int(v) if isinstance(v, float) and v.is_integer() else v


def duration(seconds: float | None) -> str:
    """``95`` -> ``1m35s``, ``3900`` -> ``1h05m``, ``93600`` -> ``1d02h``; ``-`` for None."""
    if seconds is None:
        return "-"
    s = round(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m_, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m_:02d}m"
    return f"{m_}m{s:02d}s"


def to_table(report: dict[str, Any]) -> str:
    r = report["range"]
    lines = [f"SLA report: tickets created {r['from']} .. {r['to']} ({r['timezone']}), "
             f"{report['total']['tickets']} tickets, "
             f"{report['total']['tickets_with_sla']} with an SLA"
             + (f"; queues {', '.join(report['queues'])}" if report["queues"] else "")]
    head = (f"{'GROUP':<20} {'TARGET':<15} {'CLOCKS':>6} {'MET':>5} {'BREACH':>6} {'OPEN':>5} {'CANC':>5} "
            f"{'COMPL%':>7} {'MEDIAN':>8} {'P90':>8} {'MED-BUS':>8} {'P90-BUS':>8}")
    lines += ["", head, "-" * len(head)]
    last = None
    for row in rows(report):
        label = "total" if row["scope"] == "total" else f"{row['scope']} {row['group']}"
        if last is not None and label != last:
            lines.append("")
        lines.append(
            f"{(label if label != last else ''):<20.20} {row['target']:<15} {row['count']:>6} "
            f"{row['met']:>5} {row['breached']:>6} {row['open']:>5} {row['cancelled']:>5} "
            f"{_pct(row['compliance_pct']):>7} {duration(row['median_seconds']):>8} "
            f"{duration(row['p90_seconds']):>8} {duration(row['median_business_seconds']):>8} "
            f"{duration(row['p90_business_seconds']):>8}")
        last = label
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


# --- HTML with inline SVG charts ------------------------------------------------------------

COLORS = {"first_response": "#1f77b4", "update": "#ff7f0e", "solution": "#2ca02c",
          "all": "#444444"}
_W, _H, _L, _R, _T, _B = 720, 260, 64, 16, 16, 56  # chart size and margins


def compliance_chart(report: dict[str, Any]) -> dict[str, Any]:
    """Geometry of the compliance-over-time line chart: one polyline per target (broken where
    a period has nothing decided) and a dashed one for all targets together."""
    points = report["series"]["points"]
    n = len(points)
    pw, ph = _W - _L - _R, _H - _T - _B

    def x(i: int) -> float:
        return round(_L + (pw / 2 if n == 1 else pw * i / (n - 1)), 1)

    def y(pct: float) -> float:
        return round(_T + ph * (100 - pct) / 100, 1)

    lines = []
    for key in ("all", *TARGETS):  # "all" first: the targets' dots are drawn over it
        runs: list[list[tuple[float, float]]] = [[]]
        dots = []
        for i, p in enumerate(points):
            c = p["compliance"] if key == "all" else p["targets"][key]["compliance"]
            if c is None:
                if runs[-1]:
                    runs.append([])
                continue
            runs[-1].append((x(i), y(c)))
            dots.append({"x": x(i), "y": y(c), "title": f"{p['start']} {key}: {c:.2f} %"})
        if dots:
            lines.append({"key": key, "color": COLORS[key], "dashed": key == "all",
                          "runs": [" ".join(f"{a},{b}" for a, b in r) for r in runs if r],
                          "dots": dots})
    every = max(1, math.ceil(n / 12))
    xlabels = [{"x": x(i), "text": p["start"]} for i, p in enumerate(points) if i % every == 0]
    grid = [{"y": y(v), "text": f"{v} %"} for v in (0, 25, 50, 75, 100)]
    return {"width": _W, "height": _H, "left": _L, "right": _W - _R, "top": _T,
            "bottom": _H - _B, "lines": lines, "xlabels": xlabels, "grid": grid,
            "period": report["series"]["period"], "empty": not lines}


def breaches_chart(report: dict[str, Any]) -> dict[str, Any]:
    """Geometry of the breaches-by-queue bar chart: one bar per queue, stacked by target."""
    queues = report["by_queue"]
    totals = [sum(g["targets"][t]["breached"] for t in TARGETS) for g in queues]
    top = max(totals, default=0)
    step = max(1, math.ceil(top / 5)) if top else 1
    scale_max = step * max(1, math.ceil(top / step))
    width = max(_W // 2, _L + _R + 70 * len(queues))
    ph = _H - _T - _B
    slot = (width - _L - _R) / max(1, len(queues))
    bars = []
    for i, (g, total) in enumerate(zip(queues, totals, strict=True)):
        x0 = round(_L + slot * i + slot * 0.2, 1)
        bw = round(slot * 0.6, 1)
        base = float(_H - _B)
        parts = []
        for t in TARGETS:
            n = g["targets"][t]["breached"]
            if not n:
                continue
            h = round(ph * n / scale_max, 1)
            base -= h
            parts.append({"y": round(base, 1), "height": h, "color": COLORS[t],
                          "title": f"{g['queue']} {t}: {n} breached"})
        bars.append({"x": x0, "width": bw, "label_x": round(x0 + bw / 2, 1),
                     "queue": g["queue"], "total": total, "parts": parts,
                     "total_y": round(base - 4, 1)})
    ticks = [{"y": round(_T + ph * (1 - v / scale_max), 1), "text": str(v)}
             for v in range(0, scale_max + 1, step)]
    return {"width": width, "height": _H, "left": _L, "right": width - _R, "top": _T,
            "bottom": _H - _B, "bars": bars, "ticks": ticks, "empty": top == 0}


def to_html(report: dict[str, Any]) -> str:
    """One self-contained HTML file: the tables and two inline SVG charts, no scripts and
    nothing fetched. Autoescaped: queue names are data."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(Path(__file__).parent), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["duration"] = duration
    env.filters["pct"] = _pct
    return env.get_template("report_html.j2").render(
        report=report, rows=rows(report), targets=TARGETS, colors=COLORS,
        compliance_chart=compliance_chart(report), breaches_chart=breaches_chart(report))


def render(report: dict[str, Any], fmt: str) -> str:
    import json

    if fmt == "json":
        return json.dumps(report, indent=2) + "\n"
    if fmt == "csv":
        return to_csv(report)
    if fmt == "html":
        return to_html(report)
    return to_table(report)
