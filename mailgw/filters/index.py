"""A prefilter that lets most rules be skipped without running them.

Most rules hinge on something cheap to look up: an exact sender, domain, recipient or header
value, a word the subject must contain, a literal a regex cannot match without. Such a
necessary condition is the rule's *anchor*: a set of keys of which at least one must be
present in the message. Per message the pipeline computes, once, which keys of all rules are
present (a few set lookups and substring scans in C) and runs in full only the rules whose
anchor is hit or that have none. A skipped rule could not have matched, so the verdicts are
the same as running every rule; tests/test_filters_index.py checks that on the corpus.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mailgw.filters.engine import MessageView
from mailgw.filters.model import Condition, Match

try:  # Python 3.11+: the regex parser lives in re._parser
    from re import _constants as _C
    from re import _parser as _P
except ImportError:  # pragma: no cover - older layouts
    import sre_constants as _C  # type: ignore[no-redef]
    import sre_parse as _P  # type: ignore[no-redef]

Key = tuple[str, str, str]  # (kind, field, value)
Anchor = frozenset[Key]
_MIN = 3  # shorter literals are too common to be worth a key
_TEXT_FIELDS = ("subject", "body")
_VALUE_FIELDS = ("sender", "sender_domain", "recipient")
# The only non-ASCII characters that an ASCII letter matches under re.IGNORECASE (İ ı ſ K);
# tests/test_filters_index.py recomputes the list. Text without them can be lower-cased and
# searched for an ASCII literal with the same result as the regex engine's case folding.
FOLDS_TO_ASCII = "\u0130\u0131\u017f\u212a"
_FOLDING = re.compile(f"[{FOLDS_TO_ASCII}]")
_GROUP = 8  # needles are scanned for by a shared prefix of this length first


def _pure_literal(items: Iterable[Any]) -> str | None:
    chars = []
    for op, av in items:
        if op is not _C.LITERAL:
            return None
        chars.append(chr(av))
    return "".join(chars)


def regex_literals(pattern: re.Pattern[str]) -> tuple[bool, frozenset[str]] | None:
    """(ignore case, literals): every match of ``pattern`` contains one of the literals.

    Only the top level of the pattern is read (a run of literal characters, or a group or
    alternation of plain literals); anything else gives None: no anchor, the rule always runs.
    """
    try:
        parsed = _P.parse(pattern.pattern, pattern.flags)
        flags = parsed.state.flags
    except Exception:  # noqa: BLE001 - an internal API; without it we simply do not anchor
        return None
    ignore_case = bool(flags & re.IGNORECASE)
    candidates: list[frozenset[str]] = []
    run: list[str] = []

    def flush() -> None:
        if len(run) >= _MIN:
            candidates.append(frozenset({"".join(run)}))
        run.clear()

    for op, av in parsed:
        if op is _C.LITERAL:
            run.append(chr(av))
            continue
        flush()
        body = None
        if op is _C.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                continue  # (?i:...) and friends change the case rules inside
            body = list(sub)
        elif op is _C.BRANCH:
            body = [(op, av)]
        if body is None:
            continue
        if len(body) == 1 and body[0][0] is _C.BRANCH:
            alts = [_pure_literal(alt) for alt in body[0][1][1]]
            if all(a is not None and len(a) >= _MIN for a in alts):
                candidates.append(frozenset(a for a in alts if a))
        else:
            lit = _pure_literal(body)
            if lit is not None and len(lit) >= _MIN:
                candidates.append(frozenset({lit}))
    flush()
    if ignore_case:
        # Lower-casing is a safe stand-in for the regex engine's case folding only in ASCII;
        # the pipeline runs such rules in full on messages with non-ASCII text.
        candidates = [frozenset(s.lower() for s in c) for c in candidates if all(
            s.isascii() for s in c)]
    if not candidates:
        return None
    # The most selective: the set whose shortest literal is longest.
    return ignore_case, max(candidates, key=lambda c: (min(map(len, c)), -len(c)))


def _match_anchor(field_: str, spec: Match | str, multi: bool) -> Anchor | None:
    if isinstance(spec, str):
        spec = Match(contains=spec)
    cs = spec.case_sensitive
    if field_ in _TEXT_FIELDS:
        if spec.contains is not None and len(spec.contains) >= _MIN:
            return frozenset({("in" if not cs else "incs", field_,
                               spec.contains if cs else spec.contains.lower())})
        if spec.regex is not None:
            try:
                lits = regex_literals(re.compile(spec.regex))
            except re.error:
                return None
            if lits is not None:
                ci, values = lits
                return frozenset(("rx" if ci else "rxcs", field_, v) for v in values)
        return None
    values: list[str] | None = None
    if spec.equals is not None:
        values = [spec.equals]
    elif spec.one_of is not None:
        values = list(spec.one_of)
    if not values:
        return None
    kind = "eqcs" if cs else "eq"
    return frozenset((kind, field_, v if cs else v.lower()) for v in values)


def anchor_of(c: Condition) -> Anchor | None:
    """A necessary condition of ``c`` as a set of keys (one must be present), or None."""
    found: list[Anchor] = []
    for name in _VALUE_FIELDS + _TEXT_FIELDS:
        spec = getattr(c, name)
        if spec is not None:
            a = _match_anchor(name, spec, name == "recipient")
            if a:
                found.append(a)
    for h in c.header or []:
        name = f"header:{h.name.lower()}"
        if h.exists is None:
            spec = Match(**h.model_dump(exclude={"name"}, exclude_none=True))
            a = _match_anchor(name, spec, True)
            found.append(a or frozenset({("has", name, "")}))  # a value test needs the header
        elif h.exists:
            found.append(frozenset({("has", name, "")}))
    # Presence: spam tests that need a spam header, attachment tests that need one.
    if c.spam is not None and (c.spam.flag or c.spam.score_above is not None):
        found.append(frozenset({("has", "spam", "")}))
    if c.attachment is not None:
        found.append(frozenset({("has", "attachment", "")}))
    for sub in c.all_ or []:
        a = anchor_of(sub)
        if a:
            found.append(a)
    if c.any_:
        alts = [anchor_of(sub) for sub in c.any_]
        if all(alts):
            found.append(frozenset().union(*alts))  # type: ignore[arg-type]
    if not found:
        return None
    # Every key of a mapping must hold, so any one anchor will do: exact values first
    # (the most selective), then substrings, then mere presence; fewer keys first.
    def rank(a: Anchor) -> tuple[int, int]:
        kinds = {k[0] for k in a}
        return (0 if kinds <= {"eq", "eqcs"} else 2 if "has" in kinds else 1, len(a))
    return min(found, key=rank)


@dataclass
class Index:
    """The keys of every anchored rule, arranged for one pass over a message."""

    eq: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    eqcs: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    needles: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    present: set[str] = field(default_factory=set)  # "spam", "attachment", "header:NAME"

    def add(self, anchor: Anchor) -> None:
        for kind, field_, value in anchor:
            if kind == "eq":
                self.eq[field_].add(value)
            elif kind == "eqcs":
                self.eqcs[field_].add(value)
            elif kind == "has":
                self.present.add(field_)
            else:
                self.needles[(kind, field_)].add(value)

    def freeze(self) -> None:
        self.eq, self.eqcs, self.needles = dict(self.eq), dict(self.eqcs), dict(self.needles)
        self._fields = sorted(set(self.eq) | set(self.eqcs))
        # Needles grouped by their first characters: one scan for the shared prefix, and the
        # needles themselves only where it occurs (rule sets often share a prefix).
        self._needles = []
        for (kind, f), values in self.needles.items():
            groups: dict[str, list[str]] = defaultdict(list)
            for n in sorted(values):
                groups[n[:_GROUP]].append(n)
            self._needles.append((kind, f, tuple(values), tuple(
                (prefix, tuple(ns)) for prefix, ns in groups.items())))
        self._headers = [(f, f[7:]) for f in sorted(self.present) if f.startswith("header:")]
        self._spam = "spam" in self.present
        self._attachment = "attachment" in self.present

    def hits(self, v: MessageView) -> set[Key]:
        out: set[Key] = set()
        for f in self._fields:
            if f == "sender":
                values: Iterable[str] = (v.sender,)
            elif f == "sender_domain":
                values = (v.sender_domain,)
            elif f == "recipient":
                values = v.recipients
            else:
                values = v.headers.get(f[7:], ())
            ci, cs = self.eq.get(f), self.eqcs.get(f)
            for x in values:
                if ci:
                    low = x.lower()
                    if low in ci:
                        out.add(("eq", f, low))
                if cs and x in cs:
                    out.add(("eqcs", f, x))
        headers = v.headers
        if self._spam and ("x-spam-flag" in headers or "x-spam-score" in headers
                           or "x-spam-status" in headers):
            out.add(("has", "spam", ""))
        if self._attachment and v.mail.attachments:
            out.add(("has", "attachment", ""))
        for f, name in self._headers:
            if name in headers:
                out.add(("has", f, ""))
        for kind, f, needles, grouped in self._needles:
            text = v.subject if f == "subject" else v.body
            if kind == "rx" and not text.isascii() and _FOLDING.search(text):
                out.update((kind, f, n) for n in needles)  # run those rules in full
                continue
            hay = text if kind in ("incs", "rxcs") else (
                v.subject_lower if f == "subject" else v.body_lower)
            for prefix, members in grouped:
                if prefix in hay:
                    for n in members:
                        if n in hay:
                            out.add((kind, f, n))
        return out
