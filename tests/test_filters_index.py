"""The prefilter skips only rules that cannot match: with and without it, every verdict and
every decision are the same, on the benchmark's 200 rules over corpus messages."""

from __future__ import annotations

import dataclasses
import itertools
import re
import sys
from pathlib import Path

import pytest

from mailgw.filters.engine import MessageView
from mailgw.filters.index import FOLDS_TO_ASCII, regex_literals
from mailgw.filters.loader import load_pipeline
from mailgw.mail.parse import parse_message
from mailgw.settings import Settings
from tests.corpus import iter_corpus_messages
from tests.helpers import mail

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from filters_bench import make_rules  # noqa: E402


@pytest.mark.parametrize("pattern, expected", [
    (r"(?i)\b(order|ticket)[ -]?#?3\d*\b", (True, {"order", "ticket"})),
    (r"^\[svc1\]", (False, {"[svc1]"})),
    (r"Invoice (?P<no>\d+)", (False, {"Invoice "})),
    (r"(?i)INVOICE", (True, {"invoice"})),
    (r"ab|cd", None),  # too short to be worth a key
    (r"(?i)straße", None),  # non-ASCII under IGNORECASE: case folding differs
    (r"[a-z]+@x", None),
    (r"(?i:abc)def", (False, {"def"})),
])
def test_required_literals(pattern, expected):
    got = regex_literals(re.compile(pattern))
    assert (got if got is None else (got[0], set(got[1]))) == expected


def test_the_non_ascii_characters_that_fold_to_ascii_letters():
    # The prefilter lower-cases text for (?i) literals and falls back to running the rule when
    # one of these is present; the list must be exactly what the regex engine folds.
    letter = re.compile("(?i)[a-z]")
    found = "".join(chr(c) for c in range(128, sys.maxunicode + 1) if letter.match(chr(c)))
    assert found == FOLDS_TO_ASCII


def test_same_verdicts_with_and_without_the_prefilter(tmp_path):
    extra = """
  - name: ci-regex-nonascii
    when: {subject: {regex: '(?i)\\bstop\\b'}}
    then: {tags: [stop]}
  - name: any-of-anchors
    when:
      any:
        - {sender_domain: {equals: apache.org}}
        - {subject: {regex: '(?i)\\[(VOTE|RESULT)\\]'}}
    then: {tags: [apache]}
  - name: list-header
    when: {header: {name: list-id, regex: 'dev\\.'}}
    then: {tags: [dev-list]}
"""
    d = tmp_path / "filters"
    d.mkdir()
    (d / "rules.yaml").write_text(make_rules(200) + extra)
    settings = Settings.model_validate({"queues": [
        {"name": "support", "addresses": ["support@example.com"]},
        {"name": "billing", "addresses": ["billing@example.com"]}]})
    indexed = load_pipeline(d, settings)
    plain = dataclasses.replace(indexed, index=None)
    assert sum(r.guard is not None for r in indexed.rules) >= 140

    raws = [raw for _, raw in itertools.islice(iter_corpus_messages(), 0, 3000, 3)]
    raws += [mail("Order #12 late", sender="ceo1@bigcorp.example", X_Customer_Id="C3",
                  to="team2@example.com"),
             mail("[svc4] project-2 reference", body="reference code rc-1-x",
                  sender="x@customer5.example", X_Priority="7"),
             mail("ſtop the ſervice", sender="x@y.test"),  # long s folds to s in (?i)
             mail("Ünïcode [VOTE] release", sender="x@y.test"),
             mail("[svc1] ok", body="Reference Code RC-1-x and reference code rc-12-y")]
    matched = 0
    for raw in raws:
        try:
            m = parse_message(raw)
        except Exception:  # noqa: BLE001 - not mail
            continue
        d1, t1 = indexed.run(MessageView(m, queue="support", rcpt_tos=["team2@example.com"]))
        d2, t2 = plain.run(MessageView(m, queue="support", rcpt_tos=["team2@example.com"]))
        assert t1.as_json() == t2.as_json()
        assert d1.as_dict() == d2.as_dict()
        matched += len(t1.matched)
    assert matched > 20  # the rules do fire on this mail, so the comparison means something
