"""Run a compiled pipeline over one message: the decision it makes and the trace of why.

Filters read the message and change only the ``Decision``; they never touch the database
or send mail. Everything expensive (YAML, validation, regex compilation) happened once at
load, in ``loader.py``; here each rule is two prepared closures.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from copy import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mailgw.types import ParsedMail

_SCORE = re.compile(r"score=(-?[0-9]+(?:\.[0-9]+)?)", re.I)


class MessageView:
    """What conditions read: the parsed mail, its envelope and the ticket it threads into.

    Lower-cased and derived values are computed on first use and shared by every rule:
    ``__getattr__`` runs only for an attribute not set yet, computes it and stores it, so
    later reads are plain attribute reads (functools.cached_property takes a lock per read
    on Python 3.11, which costs more than most conditions).
    """

    def __init__(self, mail: ParsedMail, *, queue: str, mail_from: str | None = None,
                 rcpt_tos: tuple[str, ...] | list[str] = (), ticket_state: str | None = None,
                 ticket_queue: str | None = None, now: datetime | None = None):
        self.mail = mail
        self.envelope_from = (mail_from or "").lower()
        self.rcpt_tos = tuple(r.strip("<>").lower() for r in rcpt_tos)
        self.follow_up = ticket_state is not None
        self.ticket_state = ticket_state
        self.ticket_queue = ticket_queue
        self.initial_queue = queue
        self.current_queue = queue  # follows queue actions, for `queue:` conditions
        self.now = now or datetime.now(UTC)
        self.subject = mail.subject or ""
        self.body = mail.text or ""
        self.headers = mail.headers

    def __getattr__(self, name: str) -> Any:
        compute = _LAZY.get(name)
        if compute is None:
            raise AttributeError(name)
        value = compute(self)
        setattr(self, name, value)
        return value

    def _sender(self) -> str:
        return self.mail.from_addr or self.envelope_from

    def _sender_domain(self) -> str:
        return self.sender.rpartition("@")[2]

    def _recipients(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.mail.to, *self.mail.cc, *self.rcpt_tos)))

    def _subject_lower(self) -> str:
        return self.subject.lower()

    def _body_lower(self) -> str:
        return self.body.lower()

    def _spam_flag(self) -> bool:
        # SpamAssassin writes both; some setups only keep X-Spam-Status ("Yes, score=...").
        if (self.mail.header("x-spam-flag") or "").strip().upper() == "YES":
            return True
        return (self.mail.header("x-spam-status") or "").strip()[:3].lower() == "yes"

    def _spam_score(self) -> float | None:
        raw = self.mail.header("x-spam-score")
        if raw:
            try:
                return float(raw.strip().split()[0])
            except (ValueError, IndexError):
                pass
        status = self.mail.header("x-spam-status")
        m = _SCORE.search(status) if status else None
        return float(m.group(1)) if m else None


_LAZY: dict[str, Callable[[MessageView], Any]] = {
    name: getattr(MessageView, f"_{name}") for name in (
        "sender", "sender_domain", "recipients", "subject_lower", "body_lower", "spam_flag",
        "spam_score")
}


@dataclass(slots=True)
class Decision:
    """What the pipeline decided; process.py applies it to the ticket."""

    queue: str
    priority: int | None = None
    urgency: str | None = None
    impact: str | None = None
    type: str | None = None
    service: str | None = None
    category: str | None = None
    tags: list[str] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    customer: str | None = None
    company: str | None = None
    owner: str | None = None
    state: str | None = None
    sla: str | None = None  # an SLA name (mailgw/sla/select.py)
    ignore: bool = False
    reject: bool = False
    # None: the usual acknowledgement; False: none; a string: this template instead.
    auto_response: bool | str | None = None
    # Which rule set each field last: {field: rule name}.
    set_by: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        # Copies: a plugin that appends to a list must show up as a change.
        return {k: copy(getattr(self, k)) for k in self.__slots__  # type: ignore[attr-defined]
                if k != "set_by"}


# A change made by a rule: (field, old value, new value).
Change = tuple[str, Any, Any]
_NO_CHANGES: list[Change] = []  # shared, never appended to
Captures = list["re.Match[str]"]


@dataclass(slots=True)
class CompiledRule:
    name: str
    file: str
    when: Callable[[MessageView, Captures], bool] | None
    then: Callable[[MessageView, Decision, Captures], list[Change]]
    stop: bool
    # A necessary condition (filters/index.py): when none of these keys is in the message,
    # the rule cannot match and is not run.
    guard: frozenset[tuple[str, str, str]] | None = None
    # Each top-level key of `when` with its test, to say which one failed.
    parts: list[tuple[str, Callable[[MessageView, Captures], bool]]] = field(
        default_factory=list)

    def failed_on(self, view: MessageView) -> str | None:
        """The first key of `when` that does not hold for this message (for dry runs)."""
        for label, test in self.parts:
            try:
                if not test(view, []):
                    return label
            except Exception as exc:  # noqa: BLE001 - a plugin's bug, shown as such
                return f"{label} ({type(exc).__name__})"
        return None


@dataclass
class Trace:
    """Every rule's verdict for one message, in order."""

    results: list[tuple[CompiledRule, bool, list[Change]]] = field(default_factory=list)
    stopped_by: str | None = None
    not_evaluated: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def matched(self) -> list[str]:
        return [r.name for r, ok, _ in self.results if ok]

    def as_json(self) -> dict[str, Any]:
        return {
            "matched": [{"rule": r.name, "file": r.file, "stop": r.stop,
                         "changes": {f: [old, new] for f, old, new in ch}}
                        for r, ok, ch in self.results if ok],
            "not_matched": [r.name for r, ok, _ in self.results if not ok],
            "stopped_by": self.stopped_by,
            "not_evaluated": self.not_evaluated,
            **({"errors": self.errors} if self.errors else {}),
        }


@dataclass
class Pipeline:
    rules: list[CompiledRule]
    files: dict[str, tuple[int, int]] = field(default_factory=dict)  # for hot reload
    priority_of: Callable[[str, str], int] | None = None
    index: Any = None  # filters.index.Index; computes the keys present in a message


    def run(self, view: MessageView, decision: Decision | None = None) -> tuple[Decision, Trace]:
        decision = decision or Decision(queue=view.initial_queue)
        trace = Trace()
        results = trace.results
        rules = self.rules
        hits = self.index.hits(view) if self.index is not None else None
        for i, rule in enumerate(rules):
            guard = rule.guard
            if guard is not None and hits is not None and guard.isdisjoint(hits):
                results.append((rule, False, _NO_CHANGES))
                continue
            caps: Captures = []
            try:
                ok = rule.when is None or rule.when(view, caps)
                changes = rule.then(view, decision, caps) if ok else []
            except Exception as exc:  # noqa: BLE001 - a plugin's bug must not lose the mail
                trace.errors.append(f"rule {rule.name!r}: {type(exc).__name__}: {exc}")
                results.append((rule, False, []))
                continue
            results.append((rule, ok, changes))
            if ok:
                for f, _, _ in changes:
                    decision.set_by[f] = rule.name
                if rule.stop:
                    trace.stopped_by = rule.name
                    trace.not_evaluated = [r.name for r in rules[i + 1:]]
                    break
        if decision.priority is None and (decision.urgency or decision.impact) \
                and self.priority_of:
            # ITIL: priority from urgency x impact; a missing one counts as medium.
            u, i = decision.urgency or "medium", decision.impact or "medium"
            decision.priority = self.priority_of(u, i)
            decision.set_by["priority"] = f"matrix: urgency {u} x impact {i}"
        return decision, trace
