"""parse_message over every message of the shared corpus (../shared/corpus).

Real mail from a dozen libraries' fixtures and mailing-list archives, much of it broken on
purpose. Every message must give a ParsedMail; ParseError is allowed only for the few
inputs listed in ``tests.corpus.NOT_MAIL``, which are not email at all.
"""

from __future__ import annotations

import logging

import pytest

from mailgw.mail.parse import looks_like_mail, parse_message
from mailgw.types import ParsedMail, ParseError
from tests.corpus import BODY_ONLY, CORPUS, LAYOUT, NOT_MAIL, iter_corpus_messages

# Defects parse_message records when it had to fall back to a degraded parse.
DEGRADED = ("MIME structure not parsed", "headers not parsed")


def _problems(name: str, parsed: ParsedMail) -> list[str]:
    """What is wrong with one result, beyond not raising."""
    problems = []
    if any(d.startswith(DEGRADED) for d in parsed.defects):
        problems.append(f"degraded parse: {parsed.defects}")
    texts = [parsed.subject, parsed.text, parsed.html or "", parsed.from_name]
    texts += [v for values in parsed.headers.values() for v in values]
    texts += [a.filename or "" for a in parsed.attachments]
    if any("\x00" in t for t in texts):
        problems.append("NUL in a text field")
    try:
        "".join(texts).encode("utf-8")
    except UnicodeEncodeError:
        problems.append("lone surrogate in a text field (cannot be stored as UTF-8)")
    if not all(isinstance(a.data, bytes) for a in parsed.attachments):
        problems.append("attachment data is not bytes")
    if parsed.from_addr != parsed.from_addr.lower():
        problems.append("from_addr not lower-cased")
    return problems


def test_every_corpus_message_parses(caplog):
    # Given every message in the corpus
    seen, failures, not_mail = 0, [], set()
    with caplog.at_level(logging.WARNING, logger="mailgw.mail.sanitize"):
        for name, raw in iter_corpus_messages():
            seen += 1
            # When it is parsed
            try:
                parsed = parse_message(raw)
            except ParseError:
                not_mail.add(name)
                continue
            except Exception as exc:  # the contract: nothing but ParseError, ever
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            failures += [f"{name}: {p}" for p in _problems(name, parsed)]
    # Then nothing raised but ParseError, and nothing came out degraded or unstorable
    assert seen > 2500, f"only {seen} messages: is the corpus complete?"
    assert failures == []
    # And ParseError came exactly for the inputs that are not mail
    assert not_mail == set(NOT_MAIL)
    # And the HTML sanitiser never had to fall back to escaped text
    assert [r.getMessage() for r in caplog.records] == []


def test_not_mail_entries_are_really_not_mail():
    # Given the inputs listed as not mail, Then each exists and looks_like_mail rejects it
    found = {name: raw for name, raw in iter_corpus_messages() if name in NOT_MAIL}
    assert set(found) == set(NOT_MAIL), "NOT_MAIL names a file that is no longer yielded"
    for name, raw in found.items():
        assert not looks_like_mail(raw), name


def test_messages_that_broke_other_parsers_all_parse():
    # Given parse_failures.tsv: messages on which stdlib email (policy default) or
    # mail-parser 4.8.0 raised
    table = CORPUS / "parse_failures.tsv"
    if not table.is_file():
        pytest.skip(f"{table} not found")
    rows = [line.split("\t") for line in table.read_text().splitlines()[1:] if line.strip()]
    wanted = {row[1] for row in rows}
    assert len(wanted) >= 15
    messages = {name: raw for name, raw in iter_corpus_messages() if name in wanted}
    # Then each is yielded by the corpus iterator under the same name, and parses
    assert set(messages) == wanted
    for name, raw in messages.items():
        assert isinstance(parse_message(raw), ParsedMail), name


def test_the_corpus_layout_covers_every_folder():
    # Given the folders of the corpus, Then each one has been classified: a new folder
    # must not be silently left out of the runs above
    if not CORPUS.is_dir():
        pytest.skip(f"shared mail corpus not found at {CORPUS}")
    folders = {p.name for p in CORPUS.iterdir() if p.is_dir()}
    assert folders == set(LAYOUT) | BODY_ONLY
