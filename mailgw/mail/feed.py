"""The stdlib's MIME feed parser, without compiling a regular expression per boundary.

``email.feedparser`` compiles, for every multipart it meets, the pattern
``(?P<sep>--BOUNDARY)(?P<end>--)?(?P<ws>[ \\t]*)(?P<linesep>\\r\\n|\\r|\\n)?$``. Boundaries
are unique per message, so ``re``'s cache never hits, and compiling (pure Python in
``re._parser`` and ``re._compiler``) was about a tenth of ``parse_message``'s CPU on the
benchmark corpus (bench/RESULTS.md, issue 8 session 5).

The pattern is a literal followed by a fixed tail, so the same match is a ``startswith``
and one precompiled pattern for the tail, matched from the end of the literal: the
``end``, ``ws`` and ``linesep`` groups and whether it matches at all are the same for every
line (tests/test_parse_fast.py checks that against ``re`` on random boundaries and lines).

This module is a private copy of ``email.feedparser`` (its source executed again under
another name) whose ``re`` is a stand-in that returns such a matcher for that one pattern
and defers to ``re`` for everything else; the stdlib module itself is not changed, so
nothing else in the process is affected. Where the copy cannot be made (no source file),
the stdlib module is used as it is.
"""

from __future__ import annotations

import importlib.util
import re
from email import feedparser as _stdlib
from types import ModuleType

__all__ = ["BoundaryMatcher", "BufferedSubFile", "BytesFeedParser", "compile_pattern"]

# The pattern as email.feedparser._parsegen builds it: HEAD + re.escape("--" + boundary) + TAIL.
_HEAD = "(?P<sep>"
_TAIL = r")(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$"
_AFTER_SEPARATOR = re.compile(_TAIL[1:])  # the tail alone: (?P<end>--)?(?P<ws>...)...$
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)  # re.escape puts one backslash before a char


class BoundaryMatcher:
    """``re.compile(_HEAD + re.escape(separator) + _TAIL)``, for ``.match(line)`` only.

    The separator is a literal, so the pattern matches a line exactly when the line starts
    with it and the tail matches right after it; the groups the parser reads (``end``,
    ``linesep``) come from the tail's match. ``$`` means the same in both: the end of the
    line or just before a final newline.
    """

    __slots__ = ("separator", "_size")

    def __init__(self, separator: str) -> None:
        self.separator = separator
        self._size = len(separator)

    def match(self, line: str) -> re.Match[str] | None:
        if line.startswith(self.separator):
            return _AFTER_SEPARATOR.match(line, self._size)
        return None


def compile_pattern(pattern: str, flags: int = 0):  # type: ignore[no-untyped-def]
    """``re.compile``, except that the feed parser's boundary pattern gives a BoundaryMatcher."""
    if (not flags and isinstance(pattern, str) and pattern.startswith(_HEAD)
            and pattern.endswith(_TAIL)):
        escaped = pattern[len(_HEAD) : -len(_TAIL)]
        # Boundaries have no backslash (RFC 2046 bchars): dropping re.escape's backslashes
        # is the common way back (a substitution calls a function per escaped character).
        separator = escaped.replace("\\", "")
        if re.escape(separator) != escaped:
            separator = _ESCAPED.sub(r"\1", escaped)
        if re.escape(separator) == escaped:  # exactly re.escape's output: a literal
            return BoundaryMatcher(separator)
    return re.compile(pattern, flags)


class _Re(ModuleType):
    """``re`` as the copied feed parser sees it: compile_pattern, and everything else."""

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(re, name)


def _copy() -> ModuleType:
    try:
        spec = importlib.util.spec_from_file_location("mailgw.mail._feedparser", _stdlib.__file__)
        if spec is None or spec.loader is None:
            return _stdlib
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception:  # no source to execute: the stdlib's own, unchanged
        return _stdlib
    shim = _Re("re")
    shim.compile = compile_pattern  # type: ignore[attr-defined]
    module.re = shim  # type: ignore[attr-defined]
    return module


_module = _copy()
BytesFeedParser = _module.BytesFeedParser
BufferedSubFile = _module.BufferedSubFile
