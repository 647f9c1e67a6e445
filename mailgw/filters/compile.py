"""Turn validated rules into closures, once: regexes compiled, names checked, values prepared.

Every problem is raised as ``Problem(loc, reason)`` where ``loc`` is the path of the value in
the YAML file (``("rules", 3, "when", "subject", "regex")``), so the loader can name the file,
the line, the rule and the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import time
from operator import attrgetter
from typing import Any

from mailgw.calendar import ALWAYS, WEEKDAYS, Calendar, parse_span
from mailgw.filters.engine import Captures, Change, Decision, MessageView
from mailgw.filters.model import Actions, AttachmentMatch, Condition, Match, SpamMatch, TimeMatch
from mailgw.filters.registry import Registry

Loc = tuple[Any, ...]
Cond = Callable[[MessageView, Captures], bool]
_REF = re.compile(r"\{match\.([A-Za-z0-9_]+)\}")


class Problem(Exception):
    def __init__(self, loc: Loc, reason: str):
        super().__init__(reason)
        self.loc = loc
        self.reason = reason


@dataclass
class Known:
    """What names a rule may refer to, from the settings and templates/."""

    queues: frozenset[str]
    agents: frozenset[str]
    templates: frozenset[str] | None  # None: not checked
    calendars: dict[str, Calendar]
    registry: Registry
    slas: frozenset[str] | None = None  # None: not checked


@dataclass
class Groups:
    """Capture groups a rule's regexes offer to its values."""

    count: int = 0
    names: set[str] = field(default_factory=set)

    def add(self, rx: re.Pattern[str]) -> None:
        self.count = max(self.count, rx.groups)
        self.names.update(rx.groupindex)


def _regex(pattern: str, flags: int, loc: Loc) -> re.Pattern[str]:
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise Problem(loc, f"bad regex {pattern!r}: {exc}") from None


def text_test(spec: Match | str, loc: Loc, groups: Groups | None
              ) -> Callable[[str, Captures], bool]:
    """A test of one string value; regex hits are appended to the captures."""
    if isinstance(spec, str):
        spec = Match(contains=spec)
    cs = spec.case_sensitive
    if spec.regex is not None:
        rx = _regex(spec.regex, 0, loc + ("regex",))
        if groups is not None:
            groups.add(rx)
        search = rx.search

        def regex(value: str, caps: Captures) -> bool:
            m = search(value)
            if m is None:
                return False
            caps.append(m)
            return True
        return regex
    if spec.contains is not None:
        needle = spec.contains if cs else spec.contains.lower()
        if cs:
            return lambda value, caps: needle in value
        return lambda value, caps: needle in value.lower()
    if spec.equals is not None:
        want = spec.equals if cs else spec.equals.lower()
        if cs:
            return lambda value, caps: value == want
        return lambda value, caps: value.lower() == want
    if spec.one_of is not None:
        allowed = frozenset(spec.one_of if cs else (v.lower() for v in spec.one_of))
        if cs:
            return lambda value, caps: value in allowed
        return lambda value, caps: value.lower() in allowed
    want_exists = bool(spec.exists)
    return lambda value, caps: bool(value) == want_exists


def _field(get: Callable[[MessageView], str], spec: Match | str, loc: Loc, groups: Groups,
           lower: Callable[[MessageView], str] | None = None) -> Cond:
    """A condition on a single-valued field; ``lower`` is a cached lower-cased copy."""
    if isinstance(spec, str):
        spec = Match(contains=spec)
    if lower is not None and spec.contains is not None and not spec.case_sensitive:
        # The common case, kept cheap: lower-case the field once per message, not per rule.
        needle = spec.contains.lower()
        return lambda v, caps: needle in lower(v)
    if spec.regex is not None:
        rx = _regex(spec.regex, 0, loc + ("regex",))
        groups.add(rx)
        search = rx.search

        def regex(v: MessageView, caps: Captures) -> bool:
            m = search(get(v))
            if m is None:
                return False
            caps.append(m)
            return True
        return regex
    test = text_test(spec, loc, groups)
    return lambda v, caps: test(get(v), caps)


def _many(get: Callable[[MessageView], Any], spec: Match | str, loc: Loc, groups: Groups) -> Cond:
    """A condition on a multi-valued field: true when one value passes."""
    test = text_test(spec, loc, groups)
    if not isinstance(spec, str) and spec.exists is not None:
        want = spec.exists
        return lambda v, caps: bool(get(v)) == want
    def some(v: MessageView, caps: Captures) -> bool:
        for x in get(v):
            if test(x, caps):
                return True
        return False
    return some


def _header(h: Any, loc: Loc, groups: Groups) -> Cond:
    name = h.name.lower()
    if h.exists is not None:
        want = h.exists
        return lambda v, caps: (name in v.headers) == want
    test = text_test(Match(**h.model_dump(exclude={"name"}, exclude_none=True)), loc, groups)

    def some(v: MessageView, caps: Captures) -> bool:
        for x in v.headers.get(name, ()):
            if test(x, caps):
                return True
        return False
    return some


def _attachment(a: AttachmentMatch, loc: Loc, groups: Groups) -> Cond:
    name = text_test(a.name, loc + ("name",), groups) if a.name is not None else None
    ctype = text_test(a.type, loc + ("type",), groups) if a.type is not None else None
    lo, hi = a.min_size, a.max_size

    def one(att: Any, caps: Captures) -> bool:
        size = len(att.data)
        return ((lo is None or size >= lo) and (hi is None or size <= hi)
                and (name is None or name(att.filename or "", caps))
                and (ctype is None or ctype(att.content_type or "", caps)))
    def test(v: MessageView, caps: Captures) -> bool:
        for att in v.mail.attachments:
            if one(att, caps):
                return True
        return False
    return test


def _spam(s: SpamMatch) -> Cond:
    flag, above = s.flag, s.score_above

    def test(v: MessageView, caps: Captures) -> bool:
        if flag is not None and v.spam_flag != flag:
            return False
        if above is not None:
            score = v.spam_score
            return score is not None and score > above
        return True
    return test


def _time(t: TimeMatch, loc: Loc, known: Known) -> Cond:
    if t.calendar is not None and t.calendar not in known.calendars:
        raise Problem(loc + ("calendar",), f"unknown calendar {t.calendar!r}")
    # Without a calendar, weekdays and between are read in UTC.
    cal = known.calendars[t.calendar] if t.calendar is not None else ALWAYS
    days = frozenset(WEEKDAYS.index(d) for d in t.weekdays) if t.weekdays else None
    span = parse_span(t.between) if t.between else None
    working, holiday = t.working_hours, t.holiday

    def test(v: MessageView, caps: Captures) -> bool:
        local = cal.local(v.now)
        if days is not None and local.weekday() not in days:
            return False
        if span is not None:
            now = local.time().replace(tzinfo=None)
            if not (span[0] <= now < span[1] or (span[1] == time.max and now >= span[0])):
                return False
        if working is not None and cal.is_working_time(v.now) != working:
            return False
        return holiday is None or cal.is_holiday(v.now) == holiday
    return test


def _name(value: str, allowed: frozenset[str], what: str, loc: Loc) -> str:
    if value not in allowed:
        raise Problem(loc, f"unknown {what} {value!r}")
    return value


def _names(values: list[str], allowed: frozenset[str], what: str, loc: Loc) -> frozenset[str]:
    for i, n in enumerate(values):
        if n not in allowed:
            raise Problem(loc + (i,), f"unknown {what} {n!r}")
    return frozenset(values)


def _all(parts: list[Cond]) -> Cond:
    # Plain loops and small cases unrolled: a generator per call costs more than the test.
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        a, b = parts
        return lambda v, caps: a(v, caps) and b(v, caps)

    def every(v: MessageView, caps: Captures) -> bool:
        for p in parts:
            if not p(v, caps):
                return False
        return True
    return every


def _any(parts: list[Cond]) -> Cond:
    if len(parts) == 1:
        return parts[0]

    def some(v: MessageView, caps: Captures) -> bool:
        for p in parts:
            if p(v, caps):
                return True
        return False
    return some


def compile_condition(c: Condition, loc: Loc, known: Known, groups: Groups,
                      labelled: list[tuple[str, Cond]] | None = None) -> Cond:
    """Every key of the mapping must hold (an implicit all). ``labelled`` collects each
    key's test, for ``filters test`` to say which key failed."""
    parts: list[Cond] = []

    def add(label: str, fn: Cond) -> None:
        parts.append(fn)
        if labelled is not None:
            labelled.append((label, fn))
    if c.all_ is not None:
        add("all", _all([compile_condition(x, loc + ("all", i), known, groups)
                           for i, x in enumerate(c.all_)]))
    if c.any_ is not None:
        add("any", _any([compile_condition(x, loc + ("any", i), known, groups)
                           for i, x in enumerate(c.any_)]))
    if c.not_ is not None:
        # Captures inside a `not` never reach the values: a negated match has none.
        inner = compile_condition(c.not_, loc + ("not",), known, Groups())
        add("not", lambda v, caps: not inner(v, []))
    if c.header is not None:
        for i, h in enumerate(c.header):
            add("header", _header(h, loc + ("header", i), groups))
    if c.sender is not None:
        add("sender", _field(attrgetter("sender"), c.sender, loc + ("sender",), groups))
    if c.sender_domain is not None:
        add("sender_domain", _field(attrgetter("sender_domain"), c.sender_domain,
                            loc + ("sender_domain",), groups))
    if c.recipient is not None:
        add("recipient", _many(attrgetter("recipients"), c.recipient, loc + ("recipient",), groups))
    if c.subject is not None:
        add("subject", _field(attrgetter("subject"), c.subject, loc + ("subject",), groups,
                            attrgetter("subject_lower")))
    if c.body is not None:
        add("body", _field(attrgetter("body"), c.body, loc + ("body",), groups,
                            attrgetter("body_lower")))
    if c.attachment is not None:
        add("attachment", _attachment(c.attachment, loc + ("attachment",), groups))
    if c.spam is not None:
        add("spam", _spam(c.spam))
    if c.time is not None:
        add("time", _time(c.time, loc + ("time",), known))
    if c.follow_up is not None:
        want = c.follow_up
        add("follow_up", lambda v, caps: v.follow_up == want)
    if c.ticket_state is not None:
        states = frozenset(c.ticket_state)
        add("ticket_state", lambda v, caps: v.ticket_state in states)
    if c.ticket_queue is not None:
        tq = _names(c.ticket_queue, known.queues, "queue", loc + ("ticket_queue",))
        add("ticket_queue", lambda v, caps: v.ticket_queue in tq)
    if c.queue is not None:
        qs = _names(c.queue, known.queues, "queue", loc + ("queue",))
        # The queue chosen so far: by recipient, or by an earlier rule's action.
        add("queue", lambda v, caps: v.current_queue in qs)
    for key, arg in (c.model_extra or {}).items():
        factory = known.registry.conditions.get(key)
        if factory is None:
            raise Problem(loc + (key,), "unknown condition")
        try:
            fn = factory(arg)
        except (ValueError, TypeError) as exc:
            raise Problem(loc + (key,), f"plugin condition refused its value: {exc}") from None
        add(key, lambda v, caps, fn=fn: bool(fn(v)))
    return _all(parts)


def _value(text: str, loc: Loc, groups: Groups) -> Callable[[Captures], str]:
    """A string value, with ``{match.N}`` / ``{match.NAME}`` filled from the rule's regexes."""
    refs = _REF.findall(text)
    if not refs:
        return lambda caps: text
    for ref in refs:
        if ref.isdigit():
            if int(ref) > groups.count:
                raise Problem(loc, f"{{match.{ref}}}: the rule's regexes have "
                                   f"{groups.count} group(s)")
        elif ref not in groups.names:
            raise Problem(loc, f"{{match.{ref}}}: no regex of the rule has a group named {ref!r}")

    def group(caps: Captures, ref: str) -> str:
        for m in reversed(caps):
            try:
                got = m.group(int(ref) if ref.isdigit() else ref)
            except IndexError:  # this match has no such group; an earlier one may
                continue
            return got or ""
        return ""

    return lambda caps: _REF.sub(lambda r: group(caps, r.group(1)), text)


def compile_actions(a: Actions, loc: Loc, known: Known, groups: Groups
                    ) -> Callable[[MessageView, Decision, Captures], list[Change]]:
    steps: list[Callable[[MessageView, Decision, Captures], Change | None]] = []

    def setter(name: str, make: Callable[[Captures], Any]) -> None:
        def step(v: MessageView, d: Decision, caps: Captures) -> Change | None:
            new = make(caps)
            old = getattr(d, name)
            if new is None or old == new:
                return None
            setattr(d, name, new)
            if name == "queue":
                v.current_queue = new
            return (name, old, new)
        steps.append(step)

    if a.queue is not None:
        if "{" not in a.queue:
            _name(a.queue, known.queues, "queue", loc + ("queue",))
            q = a.queue
            setter("queue", lambda caps: q)
        else:
            # A queue from a capture is checked when the rule runs; an unknown one is ignored.
            make = _value(a.queue, loc + ("queue",), groups)
            queues = known.queues

            def q_from(caps: Captures) -> Any:
                got = make(caps)
                return got if got in queues else None
            setter("queue", q_from)
    if a.owner is not None:
        _name(a.owner, known.agents, "agent", loc + ("owner",))
        owner = a.owner
        setter("owner", lambda caps: owner)
    if a.sla is not None:
        if known.slas is not None and a.sla not in known.slas:
            raise Problem(loc + ("sla",), f"unknown SLA {a.sla!r} (slas: "
                                          f"{', '.join(sorted(known.slas)) or 'none'})")
        sla = a.sla
        setter("sla", lambda caps: sla)
    if a.auto_response is not None:
        if a.auto_response is False:
            setter("auto_response", lambda caps: False)
        else:
            name = a.auto_response.template  # type: ignore[union-attr]
            if known.templates is not None and name not in known.templates:
                raise Problem(loc + ("auto_response", "template"),
                              f"unknown template {name!r} (no templates/{name}.j2)")
            setter("auto_response", lambda caps: name)
    for key in ("priority", "urgency", "impact", "type", "state"):
        val = getattr(a, key)
        if val is not None:
            setter(key, lambda caps, val=val: val)
    for key in ("service", "category", "customer", "company"):
        val = getattr(a, key)
        if val is not None:
            setter(key, _value(val, loc + (key,), groups))
    if a.ignore:
        setter("ignore", lambda caps: True)
    if a.reject:
        setter("reject", lambda caps: True)
    if a.tags is not None or a.remove_tags is not None:
        add = [_value(t, loc + ("tags", i), groups) for i, t in enumerate(a.tags or [])]
        drop = frozenset(a.remove_tags or ())

        def tags(v: MessageView, d: Decision, caps: Captures) -> Change | None:
            old = list(d.tags)
            new = [t for t in old if t not in drop]
            for make in add:
                t = make(caps)
                if t and t not in new:
                    new.append(t)
            if new == old:
                return None
            d.tags = new
            return ("tags", old, new)
        steps.append(tags)
    if a.fields is not None:
        made = {k: (_value(val, loc + ("fields", k), groups) if isinstance(val, str)
                    else (lambda caps, val=val: val)) for k, val in a.fields.items()}

        def fields(v: MessageView, d: Decision, caps: Captures) -> Change | None:
            old = dict(d.fields)
            d.fields.update({k: make(caps) for k, make in made.items()})
            return None if d.fields == old else ("fields", old, dict(d.fields))
        steps.append(fields)
    for key, arg in (a.model_extra or {}).items():
        factory = known.registry.actions.get(key)
        if factory is None:
            raise Problem(loc + (key,), "unknown action")
        try:
            fn = factory(arg)
        except (ValueError, TypeError) as exc:
            raise Problem(loc + (key,), f"plugin action refused its value: {exc}") from None

        def plugin(v: MessageView, d: Decision, caps: Captures, fn=fn) -> list[Change]:
            before = d.as_dict()
            fn(v, d)
            after = d.as_dict()
            return [(k, before[k], after[k]) for k in after if after[k] != before[k]]
        steps.append(plugin)  # type: ignore[arg-type]

    def apply(v: MessageView, d: Decision, caps: Captures) -> list[Change]:
        out = []
        for step in steps:
            ch = step(v, d, caps)
            if ch is None:
                continue
            if isinstance(ch, list):  # a plugin action may change several fields
                out.extend(ch)
            else:
                out.append(ch)
        return out
    return apply
