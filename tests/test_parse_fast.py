"""parse_message's shortcuts give the results the plain way gave (issue 8, decision 28).

The golden file (``tests/data/parse_golden.txt``) holds a fingerprint of every field of the
ParsedMail that main's code (3e137bf, before these shortcuts) returned for a sample: a
generated corpus (bench/gen_corpus.py, seed 11) and every third message of the shared
corpus. ``bench/parse_diff.py --dump`` compares whole corpora the same way; after a change
meant to alter results, regenerate the file with ``bench/parse_diff.py --golden``.
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest

from mailgw.mail import feed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import parse_diff  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "parse_golden.txt"


def _golden() -> dict[str, str]:
    return dict(line.rstrip("\n").rsplit(" ", 1) for line in GOLDEN.open(encoding="utf-8"))


def test_the_generated_sample_parses_as_before() -> None:
    expected = _golden()
    differ = [name for name, raw in parse_diff.generated([parse_diff.GOLDEN_SEED],
                                                         parse_diff.GOLDEN_COUNT)
              if parse_diff.fingerprint(raw) != expected[name]]
    assert differ == []


def test_the_shared_corpus_sample_parses_as_before() -> None:
    from tests.corpus import CORPUS

    if not CORPUS.is_dir():
        pytest.skip(f"shared mail corpus not found at {CORPUS}")
    expected = _golden()
    sample = [(n, raw) for n, raw in parse_diff.golden_sample() if not n.startswith("gen/")]
    assert len(sample) > 800
    differ = [name for name, raw in sample if parse_diff.fingerprint(raw) != expected.get(name)]
    assert differ == []


# --- The feed parser's boundary matcher ---------------------------------------------------

_REAL_TAIL = r")(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$"


def _stdlib_pattern(boundary: str) -> str:
    """What email.feedparser._parsegen hands re.compile for a boundary."""
    return "(?P<sep>" + re.escape("--" + boundary) + _REAL_TAIL


def _same(real: re.Match[str] | None, ours: re.Match[str] | None) -> bool:
    if real is None or ours is None:
        return real is ours
    return all(real.group(g) == ours.group(g) for g in ("end", "ws", "linesep"))


def test_the_boundary_pattern_becomes_a_matcher_and_others_stay_patterns() -> None:
    matcher = feed.compile_pattern(_stdlib_pattern("=_x.y(z)*+?[]{}|^$\\ é"))
    assert isinstance(matcher, feed.BoundaryMatcher)
    assert matcher.separator == "--=_x.y(z)*+?[]{}|^$\\ é"
    assert isinstance(feed.compile_pattern(r"(?P<sep>a.b" + _REAL_TAIL), re.Pattern)  # not re.escape'd
    assert isinstance(feed.compile_pattern(_stdlib_pattern("b"), re.I), re.Pattern)
    assert isinstance(feed.compile_pattern(r"\r\n|\r|\n"), re.Pattern)


def test_the_boundary_matcher_matches_as_the_regex_does() -> None:
    rnd = random.Random(8)
    alphabet = "ab-_=.+*?()[]{}|^$\\ \t\r\n'\"é/"
    tails = ["", "--", "-", "---", " ", "\t", " \t ", "x", "\n", "\r\n", "\r", "\n\n", "\r\r\n",
             "--\n", "--\r\n", "-- \r\n", "--\t\t\n", " --\n", "--x\n", "\n ", "--\n\n"]
    for _ in range(3000):
        boundary = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 12)))
        real = re.compile(_stdlib_pattern(boundary))
        ours = feed.compile_pattern(_stdlib_pattern(boundary))
        assert isinstance(ours, feed.BoundaryMatcher)
        sep = "--" + boundary
        lines = [sep + rnd.choice(tails) + rnd.choice(tails) for _ in range(6)]
        lines += [sep[:-1], "x" + sep, sep.upper(), "", "--", sep + sep,
                  "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 20)))]
        for line in lines:
            assert _same(real.match(line), ours.match(line)), (boundary, line)


def test_the_stdlib_feed_parser_is_left_alone() -> None:
    import email.feedparser

    assert email.feedparser.re is re
    assert feed.BytesFeedParser is not email.feedparser.BytesFeedParser
