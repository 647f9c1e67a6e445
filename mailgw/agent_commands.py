"""Commands by mail (issue 7): ``#close``, ``#pending 3d``, ``#assign alice``… in the first
lines of an agent's mail, executed on one ticket, all or nothing.

The agent-mail path (mailgw/agent_mail/) establishes who the agent is (a signed reply
address, never the From: header) and which ticket the mail is about; this module reads the
commands from the new text, checks every one against the ticket and the agent's permissions,
and only if none is refused applies them in the caller's transaction. A refused mail changes
nothing, and ``refusal_text`` tells the agent why, line by line. docs/agent-commands.md is the
reference an agent reads.

``wake_pending`` is the OTRS "pending reminder": a ticket set ``#pending 3d`` goes back to
``open`` by itself when its time has passed (a scheduler job, each minute); one set
``#pending 3d close`` is closed then instead (OTRS "pending auto close").
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from mailgw import ticket_events
from mailgw.batch import batch_of
from mailgw.calendar import ALWAYS, Calendar
from mailgw.numbers import subject_pattern
from mailgw.settings import AGENT_COMMAND_ALIASES, AGENT_COMMANDS, Agent, Settings
from mailgw.store import models as m
from mailgw.types import aware as _aware

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from mailgw.outbound.render import Renderer

log = logging.getLogger(__name__)

# Aliases and what they count as in `Agent.commands`; #note is always allowed (it changes
# nothing by itself: it only keeps the mail from the customer).
ALIASES = AGENT_COMMAND_ALIASES
NOTE = "note"
KNOWN = (*AGENT_COMMANDS, *ALIASES, NOTE)
STATE_COMMANDS = ("close", "pending", "open", "merge")

# Priority words, mapped as the priority matrix counts: 1 is the most urgent, 5 the least.
PRIORITY_NAMES = {
    "critical": 1, "very high": 1, "urgent": 1,
    "high": 2,
    "normal": 3, "medium": 3,
    "low": 4,
    "very low": 5,
}
# Longest reminder #pending accepts: a typo like "#pending 300d" should not bury a ticket.
MAX_PENDING = timedelta(days=366)
WAKE_BATCH = 500

# Characters HTML-to-text conversion and mail clients leave in what looks like plain text.
_INVISIBLE = str.maketrans({"\xa0": " ", "\u2007": " ", "\u202f": " ", "\u3000": " ",
                            "\u200b": None, "\u200c": None, "\u200d": None, "\u2060": None,
                            "\ufeff": None, "\uff03": "#"})
_EMPHASIS = re.compile(r"([*_]+)(#[A-Za-z][A-Za-z_-]*?)[*_]*(?=\s|$)(.*)$")
# "#close", "#close.", "#pending: 3d"; not "#1" or "# heading".
_COMMAND = re.compile(r"#([A-Za-z][A-Za-z_-]*)[:.!]?(?:[ \t]+(.*))?$")
_SIGNATURE = ("--", "-- ", "__", "—")  # sig separators (after rstrip: "--", "__")
_DURATION_PART = re.compile(
    r"(\d+)\s*(w|wk|wks|weeks?|d|days?|h|hrs?|hours?|m|mins?|minutes?)(?![a-z])", re.I)
_UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60}
_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


@dataclass(frozen=True)
class Command:
    """One ``#word args`` line. ``name`` is lower-cased as written (``reopen`` stays
    ``reopen``); ``line`` counts from 1 in the text given to ``parse_commands``; ``raw`` is
    the line without invisible characters and emphasis marks (what the agent is quoted)."""

    name: str
    args: tuple[str, ...]
    line: int
    raw: str
    error: str | None = None  # malformed (e.g. ``#assign`` without a name): why

    @property
    def arg(self) -> str:
        return " ".join(self.args)

    @property
    def canonical(self) -> str:
        return ALIASES.get(self.name, self.name)


@dataclass
class Parsed:
    commands: list[Command]
    rest: str  # the text without the command lines (what goes to the customer, if anything)
    note: bool  # a #note line: the mail is an internal note
    errors: list[Command] = field(default_factory=list)  # malformed lines (also in commands)
    signature: str = ""  # a signature that directly followed the commands (not in rest)


@dataclass
class Result:
    command: Command
    ok: bool
    message: str
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)


class Refused(Exception):
    """A command that may not be applied; the message is what the agent reads."""


# --------------------------------------------------------------------------------------------
# Parsing


def _clean_line(line: str) -> str:
    line = line.translate(_INVISIBLE).strip()
    # Bold/italic from an HTML-to-text conversion: "**#close**", "*#tag* vip", "_#tag vip_".
    found = _EMPHASIS.match(line)
    if found:
        mark, word, rest = found.groups()
        rest = rest.strip()
        if rest.endswith(mark):
            rest = rest[: -len(mark)].rstrip()
        line = f"{word} {rest}".strip()
    return line


def parse_commands(text: str) -> Parsed:
    """Read the commands at the top of ``text`` (the agent's new text: the caller strips the
    quoted notification, but nothing breaks if it does not: a quote ends the commands).

    Commands are ``#word …`` lines before the first other line; blank lines before and between
    them are allowed. A ``-- `` signature separator ends them too, and a signature right after
    the commands is not part of ``rest``. ``#note`` marks the mail as an internal note; words
    after it on its line start the note's text. Names are case-insensitive; arguments are
    checked for shape here (``#pending`` needs one) and for meaning by ``execute``.
    """
    lines = (text or "").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    commands: list[Command] = []
    note = False
    note_text: str | None = None
    i = 0
    while i < len(lines):
        line = _clean_line(lines[i])
        if not line:
            i += 1
            continue
        found = _COMMAND.match(line)
        if not found:
            break
        name, args = found.group(1).lower(), tuple((found.group(2) or "").split())
        if name == NOTE:
            note = True
            if args:
                note_text = " ".join(args)
                i += 1
                break
        else:
            commands.append(Command(name, args, i + 1, line, _shape_error(name, args)))
        i += 1
    rest_lines = lines[i:]
    signature = ""
    first = next((j for j, x in enumerate(rest_lines) if _clean_line(x)), None)
    if first is not None and lines[i + first].rstrip().translate(_INVISIBLE) in _SIGNATURE:
        signature = "\n".join(rest_lines[first:]).strip("\n")
        rest_lines = []
    rest = "\n".join(rest_lines).strip("\n")
    if note_text is not None:
        rest = f"{note_text}\n{rest}" if rest else note_text
    return Parsed(commands, rest, note, [c for c in commands if c.error], signature)


_ARITY: dict[str, tuple[int, int | None, str]] = {
    # name: (min args, max args or None, what the argument is)
    "close": (0, 0, ""), "open": (0, 0, ""), "reopen": (0, 0, ""), "take": (0, 0, ""),
    "pending": (1, None, "a duration (3d, 4h, 1w 2d) or a date (2026-12-01, monday), "
                "optionally followed by close"),
    "assign": (1, 1, "an agent's name"),
    "priority": (1, 2, "1-5 (1 is the highest) or very low/low/normal/high/very high/critical"),
    "queue": (1, 1, "a queue name"),
    "tag": (1, None, "one or more tags"), "untag": (1, None, "one or more tags"),
    "merge": (1, 1, "the ticket to merge into, as Ticket#NUMBER"),
}


def _shape_error(name: str, args: tuple[str, ...]) -> str | None:
    if name not in _ARITY:
        return None  # unknown: execute refuses it with the list of known commands
    low, high, what = _ARITY[name]
    if len(args) < low:
        return f"#{name} needs {what}"
    if high is not None and len(args) > high:
        return (f"#{name} takes no argument" if high == 0
                else f"#{name} takes {what}, not {' '.join(args)!r}")
    return None


# --------------------------------------------------------------------------------------------
# Execution


@dataclass
class _Ctx:
    session: Session
    settings: Settings
    ticket: m.Ticket
    agent: Agent
    at: datetime
    plan: dict[str, Any]  # the ticket's attributes as they will be after the checked commands
    state_by: Command | None = None  # the state command already checked
    merge_target: m.Ticket | None = None


def execute(session: Session, settings: Settings, ticket: m.Ticket, agent: Agent,
            commands: list[Command], *, at: datetime,
            article: m.Article | None = None) -> list[Result]:
    """Check every command, then apply all of them, or none if any is refused.

    Applied commands change ``ticket`` (and, for #merge, the target ticket and the articles)
    in the caller's transaction, record an ``agent_command`` event each and tell
    ``ticket_events.ticket_changed`` once, with every change. A refusal records one
    ``agent_commands_refused`` event and changes nothing else. Nothing here commits.
    """
    if not commands:
        return []
    # Checked against the ticket as committed, and held: two agents' mails for one ticket
    # (two workers) are decided one after the other (SELECT … FOR UPDATE; SQLite's write
    # transaction already serialises). The flush keeps the caller's own pending changes.
    session.flush()
    session.refresh(ticket, with_for_update=True)
    ctx = _Ctx(session, settings, ticket, agent, at, plan={
        "state": ticket.state, "queue": ticket.queue, "owner": ticket.owner,
        "priority": ticket.priority, "tags": list(ticket.tags or []),
        "pending_until": _aware(ticket.pending_until), "closed_at": _aware(ticket.closed_at),
        "pending_action": ticket.pending_action,
        "merged_into": ticket.merged_into,
    })
    general = _general_refusal(session, settings, ticket, agent)
    results: list[Result] = []
    for cmd in commands:
        try:
            if general:
                raise Refused(general)
            new, message = _check(ctx, cmd)
        except Refused as exc:
            results.append(Result(cmd, False, str(exc)))
            continue
        changes = {k: (ctx.plan[k], v) for k, v in new.items() if ctx.plan[k] != v}
        ctx.plan.update(new)
        results.append(Result(cmd, True, message, changes))
    if refused(results):
        _refusal_event(session, ticket, agent, article, results, at)
        return results
    _apply(ctx, results, article)
    return results


def refused(results: list[Result]) -> bool:
    return any(not r.ok for r in results)


def refusal_text(results: list[Result]) -> str:
    """What the agent is told when a mail's commands are refused: every command, line by line,
    with why it was refused, or that it was not applied because another one was."""
    bad = [r for r in results if not r.ok]
    if not bad:
        return ""
    out = [f"Nothing was changed: {len(bad)} of {len(results)} command(s) refused, and "
           "commands are applied all together or not at all."]
    for r in results:
        status = (f"refused: {r.message}" if not r.ok
                  else "not applied (another command was refused)")
        out.append(f"line {r.command.line}: {r.command.raw}: {status}")
    return "\n".join(out)


def _general_refusal(session: Session, settings: Settings, ticket: m.Ticket,
                     agent: Agent) -> str | None:
    """Why ``agent`` may not command ``ticket`` at all, if they may not."""
    if ticket.state == "merged":
        into = session.get(m.Ticket, ticket.merged_into) if ticket.merged_into else None
        name = f"{settings.ticket_numbers.hook}{into.number}" if into else "another ticket"
        return f"the ticket is merged into {name}; write to that ticket instead"
    if ticket.queue not in agent.queues:
        return f"{agent.name} does not serve queue {ticket.queue}, the ticket's queue"
    return None


def _check(ctx: _Ctx, cmd: Command) -> tuple[dict[str, Any], str]:
    if cmd.name == NOTE:
        return {}, "internal note"
    handler = _HANDLERS.get(cmd.canonical)
    if handler is None:
        raise Refused(f"unknown command #{cmd.name}; known: "
                      + ", ".join(f"#{k}" for k in KNOWN))
    allowed = ctx.agent.commands
    if allowed is not None and cmd.canonical not in allowed:
        raise Refused(f"{ctx.agent.name} may not use #{cmd.name} (allowed: "
                      + (", ".join(f"#{c}" for c in allowed) or "none") + ")")
    if cmd.error:
        raise Refused(cmd.error)
    if cmd.canonical in STATE_COMMANDS:
        if ctx.state_by is not None:
            raise Refused(f"conflicts with {ctx.state_by.raw} on line {ctx.state_by.line}: "
                          "one state change per mail")
        ctx.state_by = cmd
    return handler(ctx, cmd)


def _close(ctx: _Ctx, cmd: Command) -> tuple[dict[str, Any], str]:
    if ctx.plan["state"] == "closed":
        return {}, "already closed"
    return ({"state": "closed", "closed_at": ctx.at, "pending_until": None,
             "pending_action": None}, "closed")


def _open(ctx: _Ctx, cmd: Command) -> tuple[dict[str, Any], str]:
    if ctx.plan["state"] == "open":
        return {}, "already open"
    return ({"state": "open", "closed_at": None, "pending_until": None,
             "pending_action": None}, "opened")


# "#pending 3d close": the ticket is closed, not reopened, when the time passes.
_AUTO_CLOSE = ("close", "autoclose", "auto-close")


def _pending(ctx: _Ctx, cmd: Command) -> tuple[dict[str, Any], str]:
    cal = agent_calendar(ctx.settings, ctx.agent)
    words = cmd.arg.split()
    action = "close" if any(w.lower() in _AUTO_CLOSE for w in words) else None
    when = " ".join(w for w in words if w.lower() not in _AUTO_CLOSE)
    if action and not when:
        raise Refused("#pending close needs a duration (3d, 4h) or a date (2026-12-01, monday)")
    until = pending_time(when, ctx.at, cal)
    if until <= ctx.at:
        raise Refused(f"{_show(until, cal)} is in the past")
    if until - ctx.at > MAX_PENDING:
        raise Refused(f"{_show(until, cal)} is more than {MAX_PENDING.days} days ahead")
    return ({"state": "pending", "pending_until": until, "closed_at": None,
             "pending_action": action},
            f"pending until {_show(until, cal)}" + (", then closed" if action else ""))


def _assign(ctx: _Ctx, cmd: Command) -> tuple[dict[str, Any], str]:
    target = find_agent(ctx.settings, cmd.arg)
    if target is None:
        raise Refused(f"no agent named {cmd.arg}")
    queue = ctx.plan["queue"]
    if queue not in target.queues:
        raise Refused(f"{target.name} does not serve queue {queue}")
    if target.out_of_office and target.name != ctx.agent.name:
        raise Refused(f"{target.name} is out of office")
    if ctx.plan["owner"] == target.name:
        return {}, f"already assigned to {target.name}"
    return {"owner": target.name}, f"assigned to {target.name}"


def _take(ctx: _Ctx, cmd: Command) -> tuple[dict[str, Any], str]:
    queue = ctx.plan["queue"]
    if queue not in ctx.agent.queues:
        raise Refused(f"{ctx.agent.name} does not serve queue {queue}")
    if ctx.plan["owner"] == ctx.agent.name:
        return {}, f"already assigned to {ctx.agent.name}"
    return {"owner": ctx.agent.name}, f"assigned to {ctx.agent.name}"


def _priority(ctx: _Ctx, cmd: Command) -> tuple[dict[str, Any], str]:
    value = parse_priority(cmd.arg)
    if ctx.plan["priority"] == value:
        return {}, f"priority already {value}"
    return {"priority": value}, f"priority {ctx.plan['priority']} -> {value}"


def _queue(ctx: _Ctx, cmd: Command) -> tuple[dict[str, Any], str]:
    target = next((q for q in ctx.settings.queues if q.name.lower() == cmd.arg.lower()), None)
    if target is None:
        raise Refused(f"no queue named {cmd.arg}; queues: "
                      + ", ".join(q.name for q in ctx.settings.queues))
    if target.name == ctx.plan["queue"]:
        return {}, f"already in queue {target.name}"
    if target.name not in ctx.agent.queues and target.name not in ctx.agent.move_to:
        raise Refused(f"{ctx.agent.name} may not move tickets to queue {target.name} "
                      "(not one of their queues nor in their move_to)")
    return {"queue": target.name}, f"moved to queue {target.name}"


def _tag(ctx: _Ctx, cmd: Command) -> tuple[dict[str, Any], str]:
    words = [t for a in cmd.args for t in a.split(",") if t]
    if not words:
        raise Refused(f"#{cmd.name} needs one or more tags")
    for t in words:
        if len(t) > 100:
            raise Refused(f"tag {t[:20]}… is longer than 100 characters")
    tags = list(ctx.plan["tags"])
    if cmd.name == "untag":
        new = [t for t in tags if t not in words]
        return ({"tags": new} if new != tags else {}), "untagged " + ", ".join(words)
    new = tags + [t for t in dict.fromkeys(words) if t not in tags]
    return ({"tags": new} if new != tags else {}), "tagged " + ", ".join(words)


def _merge(ctx: _Ctx, cmd: Command) -> tuple[dict[str, Any], str]:
    number = merge_number(ctx.settings, cmd.arg)
    if number is None:
        raise Refused(f"{cmd.arg} is not a ticket number (write #merge "
                      f"{ctx.settings.ticket_numbers.hook}NUMBER)")
    target = ctx.session.scalars(select(m.Ticket).where(m.Ticket.number == number)
                                 .with_for_update()).first()
    if target is None:
        raise Refused(f"no ticket {ctx.settings.ticket_numbers.hook}{number}")
    if target.id == ctx.ticket.id:
        raise Refused("a ticket cannot be merged into itself")
    if target.state in ("closed", "merged"):
        raise Refused(f"{ctx.settings.ticket_numbers.hook}{number} is {target.state}; "
                      "merge only into a ticket that is not closed or merged")
    if target.queue not in ctx.agent.queues:
        raise Refused(f"{ctx.agent.name} does not serve queue {target.queue}, the queue of "
                      f"{ctx.settings.ticket_numbers.hook}{number}")
    ctx.merge_target = target
    return ({"state": "merged", "merged_into": target.id, "pending_until": None,
             "pending_action": None},
            f"merged into {ctx.settings.ticket_numbers.hook}{number}")


_HANDLERS: dict[str, Callable[[_Ctx, Command], tuple[dict[str, Any], str]]] = {
    "close": _close, "pending": _pending, "open": _open, "assign": _assign, "take": _take,
    "priority": _priority, "queue": _queue, "tag": _tag, "merge": _merge,
}
assert set(_HANDLERS) == set(AGENT_COMMANDS), "settings.AGENT_COMMANDS and the handlers differ"


def _apply(ctx: _Ctx, results: list[Result], article: m.Article | None) -> None:
    ticket, session, at = ctx.ticket, ctx.session, ctx.at
    if article is not None and article.id is None:
        session.flush()
    combined: dict[str, tuple[Any, Any]] = {}
    for r in results:
        for key, (old, new) in r.changes.items():
            combined[key] = (combined[key][0] if key in combined else old, new)
            setattr(ticket, key, new)
        session.add(m.Event(
            type="agent_command", ticket_id=ticket.id, article_id=article.id if article else None,
            created_at=at, data={"agent": ctx.agent.name, "command": r.command.raw,
                                 "line": r.command.line, "message": r.message,
                                 "changes": _jsonable(r.changes)}))
    combined = {k: v for k, v in combined.items() if v[0] != v[1]}
    if not combined:
        return
    ticket.updated_at = at
    target = ctx.merge_target
    if target is not None:
        session.flush()  # the agent's own article, if new, moves with the others
        moved = session.execute(
            update(m.Article).where(m.Article.ticket_id == ticket.id)
            .values(ticket_id=target.id).execution_options(synchronize_session="fetch")
        ).rowcount
        batch = batch_of(session)
        if batch is not None:  # acknowledgements this worker batch has not written yet
            moved += batch.move_articles(ticket.id, target.id)
        target.updated_at = at
        session.add(m.Event(type="ticket_merged", ticket_id=target.id, created_at=at,
                            data={"from": ticket.number, "from_id": ticket.id,
                                  "articles": moved, "agent": ctx.agent.name}))
        session.add(m.Event(type="ticket_merged", ticket_id=ticket.id, created_at=at,
                            data={"into": target.number, "into_id": target.id,
                                  "articles": moved, "agent": ctx.agent.name}))
    reason = f"agent {ctx.agent.name}: " + ", ".join(r.command.raw for r in results)
    ticket_events.ticket_changed(session, ctx.settings, ticket, combined, at=at, reason=reason)


def _refusal_event(session: Session, ticket: m.Ticket, agent: Agent, article: m.Article | None,
                   results: list[Result], at: datetime) -> None:
    if article is not None and article.id is None:
        session.flush()
    session.add(m.Event(
        type="agent_commands_refused", ticket_id=ticket.id,
        article_id=article.id if article else None, created_at=at,
        data={"agent": agent.name, "results": [
            {"command": r.command.raw, "line": r.command.line, "ok": r.ok, "message": r.message}
            for r in results]}))


def resolve_merged(session: Session, ticket: m.Ticket) -> m.Ticket:
    """The ticket mail about ``ticket`` belongs on: itself, or after #merge the ticket it was
    merged into (the caller of ``execute`` stores the agent's article there)."""
    seen = {ticket.id}
    while ticket.merged_into and ticket.merged_into not in seen:
        into = session.get(m.Ticket, ticket.merged_into)
        if into is None:
            break
        seen.add(into.id)
        ticket = into
    return ticket


# --------------------------------------------------------------------------------------------
# Arguments


def find_agent(settings: Settings, name: str) -> Agent | None:
    """An agent by name (case-insensitive) or by one of their addresses."""
    key = name.strip().lower()
    for a in settings.agents:
        if a.name.lower() == key or key in a.addresses:
            return a
    return None


def parse_priority(text: str) -> int:
    key = " ".join(text.lower().replace("-", " ").replace("_", " ").split())
    if key.isdigit() and 1 <= int(key) <= 5:
        return int(key)
    if key in PRIORITY_NAMES:
        return PRIORITY_NAMES[key]
    raise Refused(f"unknown priority {text!r}: use 1-5 (1 is the highest) or "
                  + ", ".join(PRIORITY_NAMES))


def merge_number(settings: Settings, text: str) -> str | None:
    """The ticket number in ``Ticket#2026…``, ``[Ticket#2026…]`` or a bare number."""
    text = text.strip()
    found = subject_pattern(settings.ticket_numbers).search(text)
    if found:
        return found.group(1)
    hook = settings.ticket_numbers.hook
    bare = text.strip("[]")
    if bare.lower().startswith(hook.lower()):
        bare = bare[len(hook):]
    return bare if bare.isdigit() else None


def agent_calendar(settings: Settings, agent: Agent) -> Calendar:
    """The agent's calendar (for their time zone and working day), else 24x7 UTC."""
    from mailgw.assign import _calendars  # the same compiled calendars assignment uses

    return _calendars(settings).get(agent.calendar or f"agent:{agent.name}", ALWAYS)


def pending_time(text: str, at: datetime, cal: Calendar = ALWAYS) -> datetime:
    """When ``#pending TEXT`` given at ``at`` reopens the ticket (UTC).

    A duration counts from ``at`` in real time: ``3d``, ``4h``, ``30m``, ``1w``, ``2d 4h``,
    ``3 days``. A date is a day in the agent's calendar zone: ``2026-12-01`` (with an optional
    ``14:00`` or ``T14:00``), ``tomorrow``, or a weekday (``monday``, ``mon``: the next one,
    never today); a day without a time means the start of the agent's working time that day
    (midnight without working hours).
    """
    arg = " ".join(text.lower().split())
    if not arg:
        raise Refused("#pending needs a duration (3d, 4h) or a date (2026-12-01, monday)")
    parts = _DURATION_PART.findall(arg)
    if parts and _DURATION_PART.sub("", arg).strip(" ,") == "":
        seconds = sum(int(n) * _UNITS[unit[0]] for n, unit in parts)
        if seconds <= 0:
            raise Refused("the duration is zero")
        if seconds > MAX_PENDING.total_seconds():
            raise Refused(f"{text.strip()} is more than {MAX_PENDING.days} days")
        return at + timedelta(seconds=seconds)
    today = cal.local(at).date()
    day: date | None = None
    clock: time | None = None
    if arg == "tomorrow":
        day = today + timedelta(days=1)
    elif (wd := _weekday(arg)) is not None:
        day = today + timedelta(days=(wd - today.weekday() - 1) % 7 + 1)
    else:
        try:
            stamp = datetime.fromisoformat(arg.replace(" ", "T", 1).upper())
        except ValueError:
            raise Refused(f"{text.strip()!r} is not a duration (3d, 4h, 1w 2d) or a date "
                          "(2026-12-01, 2026-12-01 14:00, tomorrow, monday)") from None
        if stamp.tzinfo is not None:
            return stamp.astimezone(UTC)
        day = stamp.date()
        clock = None if re.fullmatch(r"\d{4}-\d{2}-\d{2}", arg) else stamp.time()
    if clock is not None:
        return datetime.combine(day, clock, cal.zone).astimezone(UTC)
    midnight = datetime.combine(day, time(0), cal.zone).astimezone(UTC)
    start = cal.next_working(midnight)
    # A holiday or a day without working hours: the day's start, not some later day.
    return start if cal.local(start).date() == day else midnight


def _weekday(arg: str) -> int | None:
    for i, name in enumerate(_WEEKDAYS):
        if arg == name or (len(arg) >= 3 and name.startswith(arg)):
            return i
    return None


def _show(moment: datetime, cal: Calendar) -> str:
    local = cal.local(moment)
    text = local.strftime("%a %Y-%m-%d %H:%M %Z")
    if local.utcoffset():
        text += moment.astimezone(UTC).strftime(" (%H:%M UTC)")
    return text




def _jsonable(changes: dict[str, tuple[Any, Any]]) -> dict[str, list[Any]]:
    def conv(v: Any) -> Any:
        return v.isoformat() if isinstance(v, datetime) else v
    return {k: [conv(a), conv(b)] for k, (a, b) in changes.items()}


# --------------------------------------------------------------------------------------------
# Pending reminder


def wake_pending(session: Session, settings: Settings, now: datetime,
                 limit: int = WAKE_BATCH, renderer: Renderer | None = None) -> int:
    """Reopen up to ``limit`` pending tickets whose ``pending_until`` has passed (or close
    those set ``#pending … close``); returns how many. Reads the partial index on
    ``pending_until``; on PostgreSQL the rows are locked with SKIP LOCKED so schedulers on two
    nodes do not both wake a ticket."""
    # A ticket that left pending another way (a customer reply) keeps a stale time; clear
    # those so the index holds only live reminders.
    session.execute(
        update(m.Ticket)
        .where(m.Ticket.pending_until.is_not(None), m.Ticket.pending_until <= now,
               m.Ticket.state != "pending")
        .values(pending_until=None, pending_action=None)
        .execution_options(synchronize_session=False))
    due = session.scalars(
        select(m.Ticket)
        .where(m.Ticket.pending_until.is_not(None), m.Ticket.pending_until <= now,
               m.Ticket.state == "pending")
        .order_by(m.Ticket.pending_until).limit(limit)
        .with_for_update(skip_locked=True)).all()
    for t in due:
        until = _aware(t.pending_until)
        if t.pending_action == "close":
            _auto_close(session, settings, t, until, now)
            continue
        t.state, t.pending_until, t.updated_at = "open", None, now
        reason = f"pending reminder: pending until {until.isoformat() if until else '?'} passed"
        session.add(m.Event(type="state_changed", ticket_id=t.id, created_at=now,
                            data={"old": "pending", "new": "open", "reason": reason}))
        ticket_events.ticket_changed(
            session, settings, t, {"state": ("pending", "open"), "pending_until": (until, None)},
            at=now, reason=reason)
        if renderer is not None:  # the owner hears of it by mail (docs/agent-commands.md)
            from mailgw.agent_mail.notify import notify_pending_reminder

            notify_pending_reminder(session, settings, renderer, t, until=until, at=now)
    return len(due)


def _auto_close(session: Session, settings: Settings, t: m.Ticket, until: datetime | None,
                now: datetime) -> None:
    """OTRS "pending auto close": the agent set ``#pending 3d close`` and nobody wrote since."""
    t.state, t.closed_at, t.updated_at = "closed", now, now
    t.pending_until, t.pending_action = None, None
    reason = (f"pending auto close: pending until {until.isoformat() if until else '?'} "
              "passed")
    session.add(m.Event(type="state_changed", ticket_id=t.id, created_at=now,
                        data={"old": "pending", "new": "closed", "reason": reason}))
    ticket_events.ticket_changed(
        session, settings, t, {"state": ("pending", "closed"), "pending_until": (until, None),
                               "closed_at": (None, now)}, at=now, reason=reason)


def wake_pending_job(engine: Engine, settings: Settings,
                     renderer: Renderer | None = None) -> int:
    """The scheduler job (mailgw/gateway.py, each minute): wake every due ticket, a batch
    per transaction."""
    from mailgw.store.db import session_factory

    factory, total = session_factory(engine), 0
    while True:
        with factory.begin() as session:
            n = wake_pending(session, settings, datetime.now(UTC), renderer=renderer)
        total += n
        if n < WAKE_BATCH:
            break
    if total:
        log.info("pending reminder: %d ticket(s) reopened", total)
    return total
