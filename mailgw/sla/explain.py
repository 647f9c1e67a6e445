"""The SLA ledger in words: why a clock is due when it is.

``explain_ticket`` turns a ticket's clocks and segments into plain data (the ``"sla"`` key
of ``mailgw explain --json``) with one sentence per ledger entry, e.g.::

    received Fri 2026-11-27 17:55 (ticket opened by a message from alice@customer.test)
    Fri 17:55–18:00 5 min
    Mon 09:00–09:55 55 min
    due Mon 2026-11-30 09:55 because 60 business minutes of calendar office (Europe/Berlin)

Times are shown in the clock's calendar zone (UTC for 24x7 clocks). Reports may reuse
``describe_clock``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgw.calendar import Calendar
from mailgw.settings import Settings
from mailgw.sla.clocks import calendar_for
from mailgw.store import models as m
from mailgw.types import aware

# At most this many working periods are listed per segment; the rest is summed up.
MAX_PERIODS = 12


def duration(seconds: float) -> str:
    """``3300`` -> ``55 min``; ``5400`` -> ``1 h 30 min``; ``0`` -> ``0 min``."""
    minutes = round(seconds / 60)
    h, mins = divmod(minutes, 60)
    if not h:
        return f"{mins} min"
    return f"{h} h {mins} min" if mins else f"{h} h"


def _when(cal: Calendar, t: datetime) -> str:
    return cal.local(t).strftime("%a %Y-%m-%d %H:%M")


def _hm(cal: Calendar, t: datetime, day_of: datetime) -> str:
    lt = cal.local(t)
    # A period ending at midnight ends "24:00" of its day, not 00:00 of the next.
    if lt.date() > cal.local(day_of).date() and lt.time().hour == 0 and lt.minute == 0:
        return "24:00"
    return lt.strftime("%H:%M")


def working_periods(cal: Calendar, start: datetime, end: datetime
                    ) -> list[tuple[datetime, datetime]]:
    """The working spans between two instants (each part of one local day)."""
    out: list[tuple[datetime, datetime]] = []
    if end <= start:
        return out
    if cal.always:
        # 24x7: one period per local day, so a long span still reads day by day
        t = start
        while t < end:
            local = cal.local(t)
            nxt = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(),
                                   cal.zone).astimezone(UTC)
            out.append((t, min(nxt, end)))
            t = nxt
        return out
    for day in cal._days_from(start):
        spans = cal.day_spans(day)
        if spans and spans[0][0] >= end:
            break
        for a, b in spans:
            lo, hi = max(a, start), min(b, end)
            if hi > lo:
                out.append((lo, hi))
        if cal.local(end).date() <= day:
            break
    return out


def _periods_text(cal: Calendar, start: datetime, end: datetime) -> list[str]:
    periods = working_periods(cal, start, end)
    lines = [f"{cal.local(a).strftime('%a')} {_hm(cal, a, a)}–{_hm(cal, b, a)} "
             f"{duration((b - a).total_seconds())}" for a, b in periods[:MAX_PERIODS]]
    rest = periods[MAX_PERIODS:]
    if rest:
        secs = sum((b - a).total_seconds() for a, b in rest)
        lines.append(f"… {len(rest)} more working periods to {_when(cal, rest[-1][1])}, "
                     f"{duration(secs)}")
    return lines


def _goal_words(clock: m.SlaClock, cal: Calendar) -> str:
    if clock.calendar is None:
        return f"{clock.goal_minutes} calendar minutes (24x7)"
    return (f"{clock.goal_minutes} business minutes of calendar {clock.calendar} "
            f"({cal.zone.key})")


# A notice sent more than this after its level was reached was deferred (outside working
# hours) or late (no sweep ran); the template's ``delayed`` uses the same minute.
DELAYED = timedelta(minutes=1)


def describe_notice(notice: m.SlaNotice, reached: datetime | None, cal: Calendar
                    ) -> dict[str, Any]:
    """One fired level of a clock (an ``sla_notices`` row): when the level was reached (from
    the ``sla_warning``/``sla_breach`` event), when it was sent and to whom, what it did."""
    fired = aware(notice.fired_at)
    assert fired is not None
    done = notice.actions or {}
    deferred = reached is not None and fired - reached > DELAYED
    to = list(done.get("recipients") or [])
    changes = done.get("changes") or {}
    text = f"{notice.kind} {notice.percent} % sent {_when(cal, fired)}"
    if deferred:
        assert reached is not None
        text += (f", deferred from {_when(cal, reached)} "
                 f"({duration((fired - reached).total_seconds())} later)")
    elif reached is not None:
        text += f" (reached {_when(cal, reached)})"
    text += f" to {', '.join(to)}" if to else " to nobody"
    if done.get("unaddressed"):
        missing = "; ".join(done["unaddressed"])
        text += f" ({missing})" if not to else f" (not to {missing})"
    if changes:
        text += "; " + ", ".join(f"{k} {_plain(v[0])} -> {_plain(v[1])}"
                                 for k, v in changes.items())
    if done.get("notes"):
        text += "; " + "; ".join(done["notes"])

    def iso(t: datetime | None) -> str | None:
        return cal.local(t).isoformat() if t is not None else None

    return {"level": notice.level, "percent": notice.percent, "kind": notice.kind,
            "reached_at": iso(reached), "fired_at": iso(fired),
            "deferred": deferred, "delay_seconds":
                round((fired - reached).total_seconds()) if reached is not None else None,
            "due_at": iso(aware(notice.due_at)), "recipients": to,
            "unaddressed": list(done.get("unaddressed") or []), "changes": changes,
            "notes": list(done.get("notes") or []), "template": done.get("template"),
            "article_id": done.get("article_id"), "node": notice.node, "text": text}


def _plain(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(str(x) for x in v) + "]"
    return "none" if v is None else str(v)


def describe_clock(clock: m.SlaClock, segments: list[m.SlaSegment], settings: Settings,
                   now: datetime | None = None,
                   notices: Sequence[tuple[m.SlaNotice, datetime | None]] = ()
                   ) -> dict[str, Any]:
    """One clock as data plus its ledger in words (``ledger``: a list of lines), a one-line
    ``summary`` and the ``notices`` fired for it (each with the instant its level was
    reached, if known)."""
    now = now or datetime.now(UTC)
    cal = calendar_for(settings, clock.calendar)
    due = aware(clock.due_at)
    lines: list[str] = []
    first = True
    for seg in segments:
        start = aware(seg.start_at)
        end = aware(seg.end_at)
        assert start is not None
        if seg.kind == "stopped":
            lines.append(f"{_when(cal, start)} stopped: {seg.reason}")
            continue
        if seg.kind == "paused":
            until = _when(cal, end) if end is not None else "now"
            lines.append(f"{_when(cal, start)} – {until} paused: {seg.reason}")
            continue
        head = ("received " if first and clock.target != "solution" else
                "started " if first else "runs again ")
        text = f"{head}{_when(cal, start)} ({seg.reason})"
        nxt = cal.next_working(start)
        if nxt > start:
            text += f", outside working hours, counting starts {_when(cal, nxt)}"
        lines.append(text)
        first = False
        # an open segment: its working periods until the due time (the projection), or
        # until now when it is already past due
        upto = end if end is not None else due if due is not None and due > start else now
        lines.extend("  " + p for p in _periods_text(cal, start, upto))
        if end is None and due is not None and now > due > start:
            lines.append(f"  still running, {duration(cal.working_seconds(due, now))} "
                         "past due")
        first = False
    goal = _goal_words(clock, cal)
    used = clock.used_seconds
    if clock.state == "running" and due is not None:
        summary = f"due {_when(cal, due)} because {goal}"
        if used:
            summary += f", {duration(used)} of it used before {_when(cal, aware(clock.running_since))}"  # type: ignore[arg-type]
        if due < now:
            summary = "BREACHED: " + summary
    elif clock.state == "paused":
        summary = (f"paused: {duration(used)} of {duration(clock.goal_minutes * 60)} used "
                   f"({goal}); no due time while paused")
    else:
        when = aware(clock.stopped_at)
        summary = (f"{clock.outcome} {_when(cal, when) if when else ''}: {duration(used)} "
                   f"used of {goal}")
        if clock.outcome == "breached" and clock.breached_at is not None:
            summary += f"; due was {_when(cal, aware(clock.breached_at))}"  # type: ignore[arg-type]
    lines.append(summary)

    def iso(t: datetime | None) -> str | None:
        return cal.local(t).isoformat() if t is not None else None

    return {
        "target": clock.target, "cycle": clock.cycle, "sla": clock.sla,
        "calendar": clock.calendar, "timezone": cal.zone.key, "state": clock.state,
        "outcome": clock.outcome, "goal_minutes": clock.goal_minutes,
        "used_seconds": clock.used_seconds, "started_at": iso(aware(clock.started_at)),
        "due_at": iso(due), "breached_at": iso(aware(clock.breached_at)),
        "stopped_at": iso(aware(clock.stopped_at)),
        "next_level": clock.next_level, "next_notice_at": iso(aware(clock.next_notice_at)),
        "summary": summary, "ledger": lines,
        "segments": [{"kind": s.kind, "start_at": iso(aware(s.start_at)),
                      "end_at": iso(aware(s.end_at)), "reason": s.reason,
                      "counted_seconds": s.counted_seconds} for s in segments],
        "notices": [describe_notice(n, reached, cal) for n, reached in notices],
    }


def explain_ticket(session: Session, settings: Settings, ticket: m.Ticket,
                   now: datetime | None = None) -> dict[str, Any]:
    """The ``"sla"`` section of ``mailgw explain``: the SLA, why, and every clock."""
    clocks = list(session.scalars(select(m.SlaClock).where(m.SlaClock.ticket_id == ticket.id)
                                  .order_by(m.SlaClock.id)))
    segs: dict[int, list[m.SlaSegment]] = {}
    notices: dict[int, list[tuple[m.SlaNotice, datetime | None]]] = {}
    if clocks:
        for s in session.scalars(select(m.SlaSegment).where(
                m.SlaSegment.ticket_id == ticket.id).order_by(m.SlaSegment.id)):
            segs.setdefault(s.clock_id, []).append(s)
        # When each level was reached: the sweep's sla_warning / sla_breach events say it
        # (the notice row has when it was sent).
        reached: dict[tuple[int, int], datetime] = {}
        for data in session.scalars(select(m.Event.data).where(
                m.Event.ticket_id == ticket.id,
                m.Event.type.in_(("sla_warning", "sla_breach")))):
            try:
                reached[(int(data["clock_id"]), int(data["level"]))] = datetime.fromisoformat(
                    data["reached_at"])
            except (KeyError, TypeError, ValueError):
                continue
        for n in session.scalars(select(m.SlaNotice).where(m.SlaNotice.ticket_id == ticket.id)
                                 .order_by(m.SlaNotice.fired_at, m.SlaNotice.level)):
            notices.setdefault(n.clock_id, []).append(
                (n, aware(reached.get((n.clock_id, n.level)))))
    return {"sla": ticket.sla, "reason": ticket.sla_reason,
            "clocks": [describe_clock(c, segs.get(c.id, []), settings, now,
                                      notices.get(c.id, [])) for c in clocks]}


def render_text(data: dict[str, Any]) -> list[str]:
    """The ``sla`` section as lines for the terminal."""
    if data["sla"] is None and not data["clocks"]:
        return ["SLA: none applies"]
    out = [f"SLA: {data['sla'] or 'none now'}" + (f" ({data['reason']})" if data["reason"]
                                                  else "")]
    for c in data["clocks"]:
        cycle = f" #{c['cycle']}" if c["target"] == "update" else ""
        out.append(f"  {c['target']}{cycle} [{c['state']}"
                   + (f", {c['outcome']}" if c["outcome"] else "") + f"] {c['summary']}")
        out.extend(f"     {line}" for line in c["ledger"][:-1])
        out.extend(f"     notice: {n['text']}" for n in c.get("notices", []))
    return out
