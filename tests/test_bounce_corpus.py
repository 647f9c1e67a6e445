"""Bounce classification measured on real mail (skips without ../shared/corpus).

- flufl-bounce (Mailman's detector test set): every message must be classified ``bounce`` or
  ``delay`` with exactly the failed addresses of ``expected_detectors.json`` (compared
  case-insensitively) for at least 95% of them.
- The DSNs of enmime, flanker, ruby-mail-gem and mimekit: all classified as bounces.
- The human list mail of ponymail and notmuch: none classified as a bounce.
"""

from __future__ import annotations

import json

import pytest

from mailgw.mail.classify import classify
from mailgw.mail.parse import parse_message
from mailgw.types import ParseError
from tests.corpus import CORPUS, iter_corpus_messages

HUMAN_SENDER = "x@customer.test"
DSN_FOLDERS = (
    "enmime/dsn/testdata/",
    "flanker/tests/fixtures/messages/bounce/",
    "ruby-mail-gem/spec/fixtures/emails/multipart_report_emails/",
    "mimekit/UnitTests/TestData/messages/delivery-status",
)


def _expected() -> dict[str, set[str]]:
    path = CORPUS / "flufl-bounce" / "expected_detectors.json"
    if not path.is_file():
        pytest.skip(f"flufl-bounce ground truth not found at {path}")
    data = json.loads(path.read_text())
    expected = {name: {a.lower() for e in entries for a in e["addresses"]}
                for name, entries in data["detectors"].items()}
    for name, check in data["scan_asserts"].items():
        if name not in expected:
            found = set(check.get("scan_message", [])) | set(check.get("permanent", []))
            expected[name] = {a.lower() for a in found | set(check.get("temporary", []))}
    return expected


def measure_flufl() -> tuple[int, int, list[tuple[str, str, list[str], list[str]]]]:
    expected = _expected()
    good, misses = 0, []
    for name, raw in iter_corpus_messages():
        short = name.rsplit("/", 1)[-1]
        if not name.startswith("flufl-bounce/data/") or short not in expected:
            continue
        cls = classify(parse_message(raw), HUMAN_SENDER, raw=raw)
        got = sorted({a.lower() for a in cls.bounce.addresses}) if cls.bounce else []
        if cls.kind in ("bounce", "delay") and set(got) == expected[short]:
            good += 1
        else:
            misses.append((short, cls.kind, got, sorted(expected[short])))
    return good, good + len(misses), misses


def test_flufl_bounce_classified_with_the_expected_failed_addresses():
    good, total, misses = measure_flufl()
    print(f"\nflufl-bounce: {good}/{total} = {good / total:.1%} bounce/delay with the expected "
          f"failed addresses; misses: {misses}")
    assert total >= 115
    assert good / total >= 0.95, misses


def test_dsns_of_other_mail_libraries_are_bounces():
    seen, missed = 0, []
    for name, raw in iter_corpus_messages():
        if name.startswith(DSN_FOLDERS):
            seen += 1
            cls = classify(parse_message(raw), HUMAN_SENDER, raw=raw)
            if cls.kind not in ("bounce", "delay"):
                missed.append((name, cls.kind))
    print(f"\nDSNs of enmime/flanker/ruby-mail-gem/mimekit: {seen - len(missed)}/{seen} bounces")
    assert seen >= 20
    assert missed == []


def test_no_human_list_mail_is_classified_as_a_bounce():
    seen, kinds, bounces = 0, {}, []
    for name, raw in iter_corpus_messages():
        if not name.startswith(("ponymail-apache-lists/", "notmuch/")):
            continue
        try:
            mail = parse_message(raw)
        except ParseError:
            continue
        seen += 1
        cls = classify(mail, HUMAN_SENDER, raw=raw)
        kinds[cls.kind] = kinds.get(cls.kind, 0) + 1
        if cls.kind in ("bounce", "delay"):
            bounces.append((name, cls.evidence))
    print(f"\nponymail + notmuch: {seen} messages, classes {kinds}")
    assert seen > 2000
    assert bounces == []
