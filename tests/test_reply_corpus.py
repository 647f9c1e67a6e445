"""Visible text of replies measured on real reply sets (skips without ../shared/corpus).

"Matches" means: equal after collapsing every run of whitespace to one space and dropping
lines that are only a horizontal rule (5+ of ``-``, ``_`` or ``=``); talon's HTML replies
are compared with all whitespace removed, as talon's own test does. Each reference defines
"visible" its own way, and we compare with the same part of ours:

- talon ``expected.json`` and mail-parser-reply's ``latest_reply``: the new text *with* its
  signature (``ReplyParts.reply``);
- zapier/github ``parse_reply`` and crisp ``visible_text``: the new text *without* the
  signature (``ReplyParts.visible``).

The references of the four reply-parser sets are those libraries' outputs, not hand-checked
truth; where they disagree with each other (is "-Abhishek Kona" a signature? is a forwarded
message quoted history?) no implementation can match all of them.
"""

from __future__ import annotations

import json
import re

import pytest

from mailgw.mail.parse import parse_message
from mailgw.mail.reply import split_html_reply, split_reply
from mailgw.mail.sanitize import sanitize_html
from tests.corpus import CORPUS

_RULE = re.compile(r"^\s*[-_=]{5,}\s*$", re.MULTILINE)


def _norm(text: str | None) -> str:
    return " ".join(_RULE.sub("", text or "").split())


def _nows(text: str | None) -> str:
    return "".join((text or "").split())


def measure() -> dict[str, tuple[int, int, list[str]]]:
    if not (CORPUS / "talon" / "expected.json").is_file():
        pytest.skip(f"reply corpus not found under {CORPUS}")
    results: dict[str, list[tuple[str, bool]]] = {}

    def add(set_name: str, name: str, ok: bool) -> None:
        results.setdefault(set_name, []).append((name, ok))

    talon = json.loads((CORPUS / "talon" / "expected.json").read_text())
    fixtures = CORPUS / "talon" / "tests" / "fixtures"
    for name, want in talon["standard_replies"].items():
        mail = parse_message((fixtures / "standard_replies" / name).read_bytes())
        parts = split_reply(mail.text) if mail.text.strip() else split_html_reply(mail.html or "")
        add("talon", name, _norm(parts.reply) == _norm(want))
    for name, want in talon["html_replies"].items():
        html = (fixtures / "html_replies" / name).read_text(errors="replace")
        parts = split_html_reply(sanitize_html(html))  # as the pipeline stores it
        add("talon", name, _nows(parts.reply) == _nows(want))
    for set_name, ref, folder in (
        ("zapier", "zapier-email-reply-parser/reference_output_email_reply_parser-0.5.12.json",
         "zapier-email-reply-parser/test/emails"),
        ("github", "github-email-reply-parser/"
                   "reference_output_python-port_email_reply_parser-0.5.12.json",
         "github-email-reply-parser/test/emails"),
    ):
        for name, out in json.loads((CORPUS / ref).read_text())["outputs"].items():
            parts = split_reply((CORPUS / folder / name).read_text(errors="replace"))
            add(set_name, name, _norm(parts.visible) == _norm(out["parse_reply"]))
    crisp = CORPUS / "crisp-email-reply-parser"
    ref = json.loads((crisp / "reference_output_email-reply-parser-2.3.7.json").read_text())
    for name, out in ref.items():
        parts = split_reply((crisp / "test" / "fixtures" / name).read_text(errors="replace"))
        add("crisp", name, _norm(parts.visible) == _norm(out["visible_text"]))
    mpr = CORPUS / "mail-parser-reply"
    ref = json.loads((mpr / "reference_output_mail-parser-reply-1.36.json").read_text())
    for name, out in ref["outputs"].items():
        parts = split_reply((mpr / "test" / "emails" / name).read_text(errors="replace"))
        add("mail-parser-reply", name, _norm(parts.reply) == _norm(out["latest_reply"]))
    return {k: (sum(ok for _, ok in v), len(v), [n for n, ok in v if not ok])
            for k, v in results.items()}


def test_visible_text_matches_the_reference_sets():
    figures = measure()
    good = sum(g for g, _, _ in figures.values())
    total = sum(t for _, t, _ in figures.values())
    lines = [f"{k}: {g}/{t} = {g / t:.1%} (misses: {', '.join(m)})"
             for k, (g, t, m) in figures.items()]
    print("\n" + "\n".join(lines) + f"\nall: {good}/{total} = {good / total:.1%}")
    assert total >= 200
    assert good / total >= 0.90
    # talon's set is hand-written ground truth: hold it to the same bar on its own
    talon_good, talon_total, _ = figures["talon"]
    assert talon_good / talon_total >= 0.90
