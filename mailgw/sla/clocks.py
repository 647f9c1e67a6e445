"""SLA clocks: stored state with indexed due times, computed at write time (decision 18).

Each target of a ticket's SLA is a ``SlaClock`` row (``update``: one row per cycle). A clock
is running, paused or stopped; while it runs, ``due_at`` and ``next_notice_at`` are computed
here, with the SLA's calendar, whenever the clock changes, so the sweep only reads an index
and never recomputes. Every start, pause, resume, SLA change and stop writes ``SlaSegment``
rows, the ledger ``mailgw explain`` reads.

Entry points: ``on_article`` and ``on_change`` (called from mailgw/ticket_events.py),
``cancel_clocks``, and for the sweep ``schedule`` and ``calendar_for``. Nothing commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from mailgw.calendar import ALWAYS, Calendar
from mailgw.settings import Settings, Sla, per_settings
from mailgw.sla.select import select_sla, sla_by_name
from mailgw.store import models as m
from mailgw.types import aware

TARGETS = ("first_response", "update", "solution")
OPEN = ("running", "paused")
# Ticket states in which no clock runs any more: the clocks are cancelled.
CANCEL_STATES = ("merged", "deleted", "removed")
# Ticket columns that choose the SLA (select.py); a change re-selects it.
SELECTING = ("queue", "priority", "customer", "company", "sla")




@per_settings
def _calendars(settings: Settings) -> dict[str, Calendar]:
    return {c.name: Calendar(c) for c in settings.calendars}


def calendar_for(settings: Settings, name: str | None) -> Calendar:
    """The compiled calendar called ``name``; ALWAYS (24x7) for None. Compiled once per
    settings object. An unknown name (a clock of a calendar removed from the config since)
    counts calendar time rather than failing the hot path."""
    if name is None:
        return ALWAYS
    return _calendars(settings).get(name, ALWAYS)


def schedule(clock: m.SlaClock, sla: Sla | None, calendar: Calendar) -> None:
    """Set ``clock.next_notice_at``: the instant the running clock reaches
    ``sla.levels[clock.next_level].percent`` of its goal; None when it is not running or no
    level is left. A level already passed gives an instant in the past (the sweep fires it
    at once)."""
    since = aware(clock.running_since)
    if (clock.state != "running" or since is None or sla is None
            or clock.next_level >= len(sla.levels)):
        clock.next_notice_at = None
        return
    percent = sla.levels[clock.next_level].percent
    left = percent * clock.goal_minutes * 60 / 100 - clock.used_seconds
    clock.next_notice_at = calendar.add(since, max(0.0, left))


def _set_due(clock: m.SlaClock, calendar: Calendar) -> None:
    since = aware(clock.running_since)
    assert since is not None
    left = clock.goal_minutes * 60 - clock.used_seconds
    breached = aware(clock.breached_at)
    # A clock already over its goal keeps the instant it really passed it.
    clock.due_at = breached if left <= 0 and breached is not None else calendar.add(
        since, max(0, left))


def _first_level(sla: Sla, goal_minutes: int, used: float) -> int:
    """The level a clock counted from the past starts at, ``used`` seconds counted now.
    Levels it has passed are not all notified: every breach level (100 % and above) is, in
    order from the first; of the warnings passed before any breach only the last one."""
    passed = [i for i, lv in enumerate(sla.levels) if lv.percent * goal_minutes * 60 / 100 <= used]
    breaches = [i for i in passed if sla.levels[i].percent >= 100]
    if breaches:
        return breaches[0]
    return passed[-1] if passed else 0


@dataclass
class _Article:
    created_at: datetime
    from_addr: str
    customer: bool  # a customer's message (not automatic)
    answer: bool  # an agent's answer (not an internal note)


class _History:
    """What a ticket's clocks would have seen: its articles and its state changes (from the
    event log) up to ``at``. Read only when an SLA applies later (``_Clocks.backfill``)."""

    # Events that record a ticket's state: the worker's reopen, the pending reminder, the CLI
    # (``state_changed``: data old/new); agent commands and filter rules (data changes.state).
    STATE_EVENTS = ("state_changed", "agent_command", "filters_applied")

    def __init__(self, created: datetime, articles: list[_Article],
                 states: list[tuple[datetime, str, str]], initial: str):
        self.created, self.articles, self.states, self.initial = (created, articles, states,
                                                                  initial)
        self.opening = articles[0] if articles and articles[0].customer else None
        answers = [a.created_at for a in articles if a.answer]
        self.last_answer = answers[-1] if answers else None
        closes = [t for t, state, _ in states if state == "closed"]
        self.last_closed = closes[-1] if closes else None

    @classmethod
    def load(cls, session: Session, ticket: m.Ticket, at: datetime) -> _History:
        at = at.astimezone(UTC)  # SQLite compares the stored UTC text
        a = m.Article
        articles = [
            _Article(aware(t), addr or "", d == "in" and st == "customer" and not auto,
                     d == "out" and st == "agent" and not internal)
            for t, d, st, auto, internal, addr in session.execute(
                select(a.created_at, a.direction, a.sender_type, a.is_automatic, a.internal,
                       a.from_addr).where(a.ticket_id == ticket.id, a.created_at <= at)
                .order_by(a.created_at, a.id))]
        states: list[tuple[datetime, str, str]] = []
        initial = None
        for t, kind, data in session.execute(
                select(m.Event.created_at, m.Event.type, m.Event.data).where(
                    m.Event.ticket_id == ticket.id, m.Event.type.in_(cls.STATE_EVENTS),
                    m.Event.created_at <= at).order_by(m.Event.created_at, m.Event.id)):
            data = data or {}
            if kind == "state_changed":
                change = [data.get("old"), data.get("new")]
                who = data.get("reason") or ""
            else:
                change = (data.get("changes") or {}).get("state")
                who = (f"agent {data.get('agent')}: {data.get('command')}"
                       if kind == "agent_command" else "filter rules")
            if not change or len(change) != 2 or not change[1]:
                continue
            initial = change[0] if initial is None else initial
            states.append((aware(t), str(change[1]), who))  # type: ignore[arg-type]
        # Without a recorded change the ticket has been in its current state throughout.
        created = aware(ticket.created_at) or at
        return cls(created, articles, states, initial or ticket.state)

    def unanswered(self) -> _Article | None:
        """The oldest customer message after the last answer and the last close."""
        since = max((t for t in (self.last_answer, self.last_closed) if t is not None),
                    default=None)
        return next((x for x in self.articles if x.customer
                     and (since is None or x.created_at > since)), None)

    def spans(self, start: datetime, end: datetime, pause_states: list[str]
              ) -> list[tuple[str, datetime, datetime, str]]:
        """[start, end) cut into running and paused spans by the recorded state: a pause
        state pauses, ``closed`` too (the clock stopped then and resumed at the reopen)."""
        state, why = self.initial, "state at creation"
        cuts: list[tuple[datetime, str, str]] = []
        for t, new, who in self.states:
            if t <= start:
                state, why = new, who
            elif t < end:
                cuts.append((t, new, who))
        out: list[tuple[str, datetime, datetime, str]] = []
        t0 = start
        for t, new, who in [*cuts, (end, state, "")]:
            if t > t0:
                kind = "paused" if state in pause_states or state == "closed" else "running"
                reason = f"state {state}" + (f" ({why})" if why else "")
                if out and out[-1][0] == kind:
                    out[-1] = (kind, out[-1][1], t, out[-1][3])
                else:
                    out.append((kind, t0, t, reason))
                t0 = t
            state, why = new, who
        return out


def goal_of(sla: Sla, target: str) -> int | None:
    return getattr(sla, target)


def _is_customer_message(article: m.Article) -> bool:
    return (article.direction == "in" and article.sender_type == "customer"
            and not article.is_automatic)


def _is_agent_answer(article: m.Article) -> bool:
    # Internal notes (Article.internal, migration 0006 of the agent-mail work) stop nothing.
    return (article.direction == "out" and article.sender_type == "agent"
            and not getattr(article, "internal", False))


class _Clocks:
    """The clocks of one ticket, loaded once per event, and the transitions on them."""

    def __init__(self, session: Session, settings: Settings | None, ticket: m.Ticket, at: datetime,
                 clocks: list[m.SlaClock]):
        self.session, self.settings, self.ticket, self.at = session, settings, ticket, at
        self.clocks = clocks
        self._open_segments: dict[int, m.SlaSegment] = {}
        self._new: list[tuple[m.SlaClock, str, str]] = []

    @classmethod
    def load(cls, session: Session, settings: Settings | None, ticket: m.Ticket,
             at: datetime, *, autoflush: bool = True) -> _Clocks:
        """``autoflush=False`` reads without flushing the session first: right where no
        clock can be pending, as every clock is flushed (or inserted) when it is started,
        and changes to loaded clocks stay on their objects (the identity map)."""
        q = select(m.SlaClock).where(m.SlaClock.ticket_id == ticket.id).order_by(m.SlaClock.id)
        if autoflush:
            return cls(session, settings, ticket, at, list(session.scalars(q)))
        with session.no_autoflush:
            return cls(session, settings, ticket, at, list(session.scalars(q)))

    # -- helpers ------------------------------------------------------------------------

    def open(self, target: str | None = None) -> list[m.SlaClock]:
        return [c for c in self.clocks if c.state in OPEN and (target is None or
                                                                c.target == target)]

    def cal(self, clock: m.SlaClock) -> Calendar:
        return calendar_for(self.settings, clock.calendar) if self.settings else ALWAYS

    def sla_of(self, clock: m.SlaClock) -> Sla | None:
        return sla_by_name(self.settings, clock.sla) if self.settings else None

    def _segment(self, clock: m.SlaClock, kind: str, reason: str) -> None:
        seg = m.SlaSegment(clock_id=clock.id, ticket_id=clock.ticket_id, kind=kind,
                           start_at=self.at, end_at=None, reason=reason)
        self.session.add(seg)
        self._open_segments[clock.id] = seg

    def _close_segment(self, clock: m.SlaClock) -> int:
        """End the clock's open segment now; the working seconds it counted (0 if paused)."""
        seg = self._open_segments.pop(clock.id, None)
        if seg is None:
            seg = self.session.scalars(select(m.SlaSegment).where(
                m.SlaSegment.clock_id == clock.id, m.SlaSegment.end_at.is_(None))
                .order_by(m.SlaSegment.id.desc())).first()
        if seg is None:
            return 0
        seg.end_at = self.at
        start = aware(seg.start_at)
        assert start is not None
        counted = round(self.cal(clock).working_seconds(start, self.at)) if (
            seg.kind == "running") else 0
        seg.counted_seconds = counted
        return counted

    def _mark(self, clock: m.SlaClock, kind: str, reason: str) -> None:
        """A zero-length ledger entry: a stop or a change, with its reason."""
        self.session.add(m.SlaSegment(clock_id=clock.id, ticket_id=clock.ticket_id, kind=kind,
                                      start_at=self.at, end_at=self.at, reason=reason,
                                      counted_seconds=0))

    def _run(self, clock: m.SlaClock, sla: Sla | None) -> None:
        cal = self.cal(clock)
        clock.state, clock.running_since = "running", self.at
        _set_due(clock, cal)
        schedule(clock, sla, cal)

    def _idle(self, clock: m.SlaClock, state: str) -> None:
        clock.state, clock.running_since = state, None
        clock.due_at = clock.next_notice_at = None

    def _over(self, clock: m.SlaClock) -> bool:
        return clock.used_seconds > clock.goal_minutes * 60

    # -- transitions --------------------------------------------------------------------

    def start(self, sla: Sla, target: str, reason: str, *, cycle: int = 0,
              paused_by: str | None = None, flush: bool = True) -> m.SlaClock | None:
        """Start a clock for ``target`` (None if the SLA has no such goal). With
        ``flush=False`` the clock is not added to the session: the caller inserts it
        (``_start_new_ticket``) or adds it and calls ``flush_new``."""
        goal = goal_of(sla, target)
        if goal is None:
            return None
        clock = m.SlaClock(ticket_id=self.ticket.id, sla=sla.name, target=target, cycle=cycle,
                           calendar=sla.calendar, goal_minutes=goal, state="running",
                           started_at=self.at, used_seconds=0, next_level=0)
        if paused_by is None:
            self._run(clock, sla)
        else:
            self._idle(clock, "paused")
        if flush:
            self.session.add(clock)
        self.clocks.append(clock)
        self._new.append((clock, "running" if paused_by is None else "paused",
                          reason if paused_by is None else f"{reason}; {paused_by}"))
        if flush:
            self.flush_new()
        return clock

    def flush_new(self) -> None:
        """Insert the clocks started since the last call and open their first segments."""
        if not self._new:
            return
        self.session.flush()  # the clocks' ids, for their segments
        for clock, kind, reason in self._new:
            self._segment(clock, kind, reason)
        self._new.clear()

    def pause(self, clock: m.SlaClock, reason: str) -> None:
        if clock.state != "running":
            return
        due = aware(clock.due_at)
        clock.used_seconds += self._close_segment(clock)
        if self._over(clock) and clock.breached_at is None and due is not None:
            clock.breached_at = due
        self._idle(clock, "paused")
        self._segment(clock, "paused", reason)

    def resume(self, clock: m.SlaClock, reason: str) -> None:
        if clock.state != "paused":
            return
        self._close_segment(clock)
        self._run(clock, self.sla_of(clock))
        self._segment(clock, "running", reason)

    def stop(self, clock: m.SlaClock, reason: str, outcome: str | None = None) -> None:
        """Stop ``clock`` now: met, breached (after its due time) or the given outcome."""
        if clock.state not in OPEN:
            return
        due = aware(clock.due_at)
        was_running = clock.state == "running"
        clock.used_seconds += self._close_segment(clock)
        late = (self.at > due) if (was_running and due is not None) else self._over(clock)
        if outcome is None:
            outcome = "breached" if late else "met"
        if late and clock.breached_at is None:
            clock.breached_at = due if due is not None else self.at
        self._idle(clock, "stopped")
        clock.outcome, clock.stopped_at = outcome, self.at
        self._mark(clock, "stopped", f"{reason}: {outcome}")

    def reopen(self, clock: m.SlaClock, reason: str, paused_by: str | None) -> None:
        """A stopped solution clock runs on (or waits, paused) when the ticket is reopened."""
        clock.outcome, clock.stopped_at = None, None
        if paused_by is None:
            self._run(clock, self.sla_of(clock))
            self._segment(clock, "running", reason)
        else:
            self._idle(clock, "paused")
            self._segment(clock, "paused", f"{reason}; {paused_by}")

    def retarget(self, clock: m.SlaClock, sla: Sla, reason: str) -> None:
        """Switch an open clock to ``sla``'s goal and calendar as if they had applied from
        the clock's start: the counted time of its running segments is recounted with the
        new calendar, and the breach instant found again."""
        goal = goal_of(sla, clock.target)
        if goal is None:
            self.stop(clock, f"{reason}; SLA {sla.name} has no {clock.target} goal",
                      outcome="cancelled")
            return
        kind = clock.state
        self._close_segment(clock)
        self.session.flush()
        clock.sla, clock.calendar, clock.goal_minutes = sla.name, sla.calendar, goal
        cal = self.cal(clock)
        used, breach = 0, None
        for seg in self.session.scalars(select(m.SlaSegment).where(
                m.SlaSegment.clock_id == clock.id, m.SlaSegment.kind == "running")
                .order_by(m.SlaSegment.id)):
            start, end = aware(seg.start_at), aware(seg.end_at)
            assert start is not None and end is not None
            seg.counted_seconds = round(cal.working_seconds(start, end))
            if breach is None and used + seg.counted_seconds > goal * 60:
                breach = cal.add(start, goal * 60 - used)
            used += seg.counted_seconds
        clock.used_seconds, clock.breached_at = used, breach
        clock.next_level = min(clock.next_level, len(sla.levels))
        if kind == "running":
            self._run(clock, sla)
        else:
            self._idle(clock, "paused")
        self._segment(clock, kind, reason)

    # -- what happens to tickets --------------------------------------------------------

    def reselect(self, why: str) -> Sla | None:
        """Choose the SLA again; switch the open clocks if it changed. Returns it."""
        assert self.settings is not None
        old = self.ticket.sla
        sla, reason = select_sla(self.settings, self.ticket)
        name = sla.name if sla is not None else None
        if (self.ticket.sla, self.ticket.sla_reason) != (name, reason):
            self.ticket.sla, self.ticket.sla_reason = name, reason
        stale = [c for c in self.open() if sla is None or c.sla != sla.name]
        if sla is None:
            for c in stale:
                self.stop(c, f"no SLA applies any more ({why})", outcome="cancelled")
            return None
        for c in stale:
            self.retarget(c, sla, f"SLA {c.sla} -> {sla.name} ({why}; {reason}): "
                                  "its goals apply from the clock's start")
        if self.ticket.state not in ("closed", *CANCEL_STATES) and (
                old != sla.name or not any(c.sla == sla.name for c in self.clocks)):
            # The SLA applies from now on to a ticket that had no clock of it: a ticket
            # without an SLA so far, another SLA, or a filter rule's choice on a follow-up
            # (the rule sets ticket.sla before this runs). Its clocks are counted from the
            # ticket's history, as if it had applied from the start. Cheap test first: on a
            # ticket whose SLA has clocks this is an in-memory check.
            self.backfill(sla, f"{why}; {reason}")
        return sla

    def backfill(self, sla: Sla, why: str) -> None:
        """Start the targets of ``sla`` that no open clock covers, from the ticket's
        history (docs/sla.md, "An SLA that applies later"): first response from the
        ticket's creation if no agent has answered and the ticket was never closed; update
        from the oldest customer message since the last answer or close; solution from the
        creation, the ticket's closed spans not counted. Pause states recorded in the
        event log (state changes by the worker, agent commands, filter rules, the CLI)
        are paused spans of the ledger; the current state decides the open span."""
        history = _History.load(self.session, self.ticket, self.at)
        note = (f"SLA {sla.name} applies since {self.at.astimezone(UTC):%Y-%m-%d %H:%M} UTC "
                f"({why}); counted from the ticket's history")
        have = {c.target for c in self.open()}
        # An open update clock (the opening message under an SLA without a first-response
        # goal) already counts the wait for the first answer: never both at once.
        if ("first_response" not in have and "update" not in have
                and goal_of(sla, "first_response") is not None):
            opening = history.opening
            if (opening is not None and history.last_answer is None
                    and history.last_closed is None):
                self._backfilled(sla, "first_response", history, aware(self.ticket.created_at)
                                 or opening.created_at,
                                 f"ticket opened by a message from {opening.from_addr}; {note}")
                have.add("first_response")
        if ("first_response" not in have and "update" not in have
                and goal_of(sla, "update") is not None):
            waiting = history.unanswered()
            if waiting is not None:
                self._backfilled(sla, "update", history, waiting.created_at,
                                 f"customer message from {waiting.from_addr}; {note}")
        if "solution" not in have and goal_of(sla, "solution") is not None:
            created = aware(self.ticket.created_at) or self.at
            self._backfilled(sla, "solution", history, created, f"ticket created; {note}")

    def _backfilled(self, sla: Sla, target: str, history: _History, start: datetime,
                    reason: str) -> None:
        """A clock of ``target`` started at ``start`` (before now), with its ledger from
        the history: running spans counted, paused ones not, the breach instant if a closed
        span passed the goal; its open span is the current state's."""
        goal = goal_of(sla, target)
        assert goal is not None
        start = min(start, self.at)
        cycle = max((c.cycle for c in self.clocks if c.target == target),
                    default=0 if target == "update" else -1) + 1
        clock = m.SlaClock(ticket_id=self.ticket.id, sla=sla.name, target=target, cycle=cycle,
                           calendar=sla.calendar, goal_minutes=goal, state="running",
                           started_at=start, used_seconds=0, next_level=0)
        cal = calendar_for(self.settings, sla.calendar) if self.settings else ALWAYS
        spans = history.spans(start, self.at, sla.pause_states)
        paused_by = self.pausing(sla)
        now_kind = "paused" if paused_by is not None else "running"
        if spans and spans[-1][0] == now_kind:
            open_kind, open_start, _, open_reason = spans.pop()
        else:
            open_kind, open_start = now_kind, self.at
            open_reason = paused_by if paused_by is not None else (
                f"state {self.ticket.state}")
        if not spans:  # the whole history is the open span: it carries the clock's reason
            open_reason = reason if open_kind == "running" else f"{reason}; {open_reason}"
        used, breach, rows = 0, None, []
        for i, (kind, a, b, why) in enumerate(spans):
            counted = round(cal.working_seconds(a, b)) if kind == "running" else 0
            if breach is None and used + counted > goal * 60:
                breach = cal.add(a, goal * 60 - used)
            used += counted
            rows.append((kind, a, b, reason if i == 0 and kind == "running" else
                         f"{reason}; {why}" if i == 0 else why, counted))
        clock.used_seconds, clock.breached_at = used, breach
        if open_kind == "running":
            clock.state, clock.running_since = "running", open_start
            _set_due(clock, cal)
            now_used = used + cal.working_seconds(open_start, self.at)
        else:
            self._idle(clock, "paused")
            now_used = used
        clock.next_level = _first_level(sla, goal, now_used)
        schedule(clock, sla, cal)
        self.session.add(clock)
        self.clocks.append(clock)
        self.session.flush()
        for kind, a, b, why, counted in rows:
            self.session.add(m.SlaSegment(clock_id=clock.id, ticket_id=clock.ticket_id,
                                          kind=kind, start_at=a, end_at=b, reason=why,
                                          counted_seconds=counted))
        seg = m.SlaSegment(clock_id=clock.id, ticket_id=clock.ticket_id, kind=open_kind,
                           start_at=open_start, end_at=None, reason=open_reason)
        self.session.add(seg)
        self._open_segments[clock.id] = seg

    def pausing(self, sla: Sla | None) -> str | None:
        state = self.ticket.state
        return f"state {state}" if sla is not None and state in sla.pause_states else None

    def sync_state(self, sla: Sla | None, why: str = "") -> None:
        """Make the clocks agree with the ticket's state: closed stops them, a pause state
        pauses them, merged cancels them, a reopened ticket's solution clock runs on."""
        state = self.ticket.state
        note = f" ({why})" if why else ""
        if state in CANCEL_STATES:
            for c in self.open():
                self.stop(c, f"ticket {state}{note}", outcome="cancelled")
            return
        if state == "closed":
            for c in self.open():
                self.stop(c, f"ticket closed{note}")
            return
        paused_by = self.pausing(sla)
        for c in self.open():
            if paused_by is not None and c.state == "running":
                self.pause(c, f"{paused_by}{note}")
            elif paused_by is None and c.state == "paused":
                self.resume(c, f"state {state}{note}")
        solutions = [c for c in self.clocks if c.target == "solution"]
        last = solutions[-1] if solutions else None
        if last is not None and last.state == "stopped" and last.outcome in ("met", "breached"):
            self.reopen(last, f"reopened, state {state}{note}", paused_by)

    def on_article(self, sla: Sla | None, article: m.Article) -> None:
        if sla is None:
            return
        if _is_customer_message(article):
            if not self.open("first_response") and not self.open("update"):
                cycle = max((c.cycle for c in self.clocks if c.target == "update"),
                            default=0) + 1
                self.start(sla, "update", f"customer message from {article.from_addr}",
                           cycle=cycle, paused_by=self.pausing(sla))
        elif _is_agent_answer(article):
            who = article.from_addr or "an agent"
            for c in self.open("first_response") + self.open("update"):
                self.stop(c, f"answer by {who}")


def on_article(session: Session, settings: Settings, ticket: m.Ticket, article: m.Article,
               *, new_ticket: bool, at: datetime) -> None:
    """An article was stored (see mailgw.ticket_events.article_added)."""
    if not settings.slas and ticket.sla is None:
        return
    if new_ticket:
        sla, reason = select_sla(settings, ticket)
        ticket.sla, ticket.sla_reason = (sla.name if sla else None), reason
        if sla is not None:
            _start_new_ticket(session, settings, ticket, article, sla, at)
        return
    # Not flushed first: in the worker's batch that would flush the batch's pending rows once
    # per follow-up instead of once at the batch's end.
    tc = _Clocks.load(session, settings, ticket, at, autoflush=False)
    sla = tc.reselect("re-checked on a new article")
    # The worker may have reopened the ticket (closed/pending -> open) for this message.
    tc.sync_state(sla, "customer follow-up" if _is_customer_message(article) else "")
    tc.on_article(sla, article)


_CLOCK_COLUMNS = ("ticket_id", "sla", "target", "cycle", "calendar", "goal_minutes", "state",
                  "started_at", "used_seconds", "running_since", "due_at", "next_level",
                  "next_notice_at")


def _start_new_ticket(session: Session, settings: Settings, ticket: m.Ticket,
                      article: m.Article, sla: Sla, at: datetime) -> None:
    """The clocks of a new ticket. The hot path: rows are written with two Core INSERTs
    (clocks with RETURNING, then their first segments) rather than the ORM unit of work,
    which costs several times more per row. A ticket born closed or merged (a filter rule)
    takes the ORM path, which can stop the clocks again."""
    tc = _Clocks(session, settings, ticket, at, [])
    paused_by = tc.pausing(sla)
    tc.start(sla, "solution", "ticket created", paused_by=paused_by, flush=False)
    if _is_customer_message(article):
        opening = f"ticket opened by a message from {article.from_addr}"
        if tc.start(sla, "first_response", opening, paused_by=paused_by, flush=False) is None:
            tc.start(sla, "update", opening, cycle=1, paused_by=paused_by, flush=False)
    if ticket.state == "closed" or ticket.state in CANCEL_STATES:
        for clock, _, _ in tc._new:
            session.add(clock)
        tc.flush_new()
        tc.sync_state(sla)
        return
    if not tc._new:
        return
    rows = [{k: getattr(c, k) for k in _CLOCK_COLUMNS} for c, _, _ in tc._new]
    # The new clocks differ in (target, cycle) (unique per ticket): their ids are matched
    # by that, not by the order of the rows. Asking for that order
    # (sort_by_parameter_order) made SQLite's driver insert the clocks one row a statement.
    table = m.SlaClock.__table__
    conn = session.connection()  # Core rows: no ORM execution path needed
    ids = {(target, cycle): i for i, target, cycle in conn.execute(
        insert(table).returning(table.c.id, table.c.target, table.c.cycle), rows)}
    conn.execute(insert(m.SlaSegment.__table__), [
        {"clock_id": ids[c.target, c.cycle], "ticket_id": c.ticket_id, "kind": kind,
         "start_at": at, "end_at": None, "reason": reason, "counted_seconds": None}
        for c, kind, reason in tc._new])


def on_change(session: Session, settings: Settings, ticket: m.Ticket,
              changes: dict[str, tuple[Any, Any]], *, at: datetime, reason: str = "") -> None:
    """Ticket attributes changed (see mailgw.ticket_events.ticket_changed)."""
    if not settings.slas and ticket.sla is None:
        return
    relevant = [k for k in changes if k in SELECTING or k == "state"]
    if not relevant:
        return
    tc = _Clocks.load(session, settings, ticket, at)
    said = ", ".join(f"{k} {changes[k][0]} -> {changes[k][1]}" for k in relevant)
    why = f"{reason}: {said}" if reason else said
    if any(k in SELECTING for k in changes) or (
            "state" in changes and ticket.sla is not None
            and not any(c.sla == ticket.sla for c in tc.clocks)):
        # (an SLA chosen while the ticket was closed starts its clocks at the reopen)
        sla = tc.reselect(why)
    else:
        sla = sla_by_name(settings, ticket.sla)
    if "state" in changes:
        tc.sync_state(sla, reason)


def cancel_clocks(session: Session, ticket: m.Ticket, reason: str, *,
                  settings: Settings | None = None, at: datetime | None = None) -> int:
    """Cancel every open clock of ``ticket`` (deleted, merged): outcome cancelled, and a
    ledger entry with ``reason``. Give ``settings`` so the last running segment is counted
    with the SLA's calendar (without: calendar time). Returns how many clocks were open."""
    tc = _Clocks.load(session, settings, ticket, at or datetime.now(UTC))
    opened = tc.open()
    for c in opened:
        tc.stop(c, reason, outcome="cancelled")
    return len(opened)
