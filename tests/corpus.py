"""Every email message of the shared test corpus, as raw bytes.

The corpus (``../shared/corpus`` from the project root, described in its README.md and in
one PROVENANCE.md per folder) mixes whole messages with things that are not messages:
attachment payloads, expected outputs, reply bodies without headers, JSON/TSV ground truth.
Which files are messages was decided per folder from its PROVENANCE.md and is written down
in ``LAYOUT`` below, so a test never guesses from a file name. Folders whose PROVENANCE
says "body-only reply fragments" hold no MIME messages and are listed in ``BODY_ONLY``.

Names are the path relative to the corpus root; a message inside an mbox file is named
``path#index`` with a 0-based index, the convention of ``parse_failures.tsv``.
"""

from __future__ import annotations

import mailbox
from collections.abc import Iterator
from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"

# folder -> (globs of single-message files, globs of mbox files), relative to the folder.
LAYOUT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # data/ also holds image and sound payloads used by CPython's tests; only msg_* are mail.
    "cpython-test-email": (("data/msg_*.txt",), ()),
    "django-helpdesk": (("tests/test_files/*.eml",), ()),
    # samples/regexes_url_*.txt are URL-regex ground truth, not mail.
    "eml-parser": (("samples/*.eml",), ()),
    # testdata/parts/*.raw are MIME parts, but PROVENANCE says all of them parse as messages.
    "enmime": (("testdata/**/*.raw", "dsn/testdata/*.raw"), ()),
    # dkim/ holds canonicalisation tests: email.* are the inputs, the rest expected outputs;
    # attachments/ are payload files.
    "flanker": (("tests/fixtures/messages/**/*.eml", "tests/fixtures/messages/dkim/email.*"), ()),
    "flufl-bounce": (("data/*.txt",), ()),
    # fixtures/corpus_expected.json is mail-parser's own output digest.
    "mail-parser-spamscope": (("mails/*",), ()),
    # mbox/*-summary.txt are expected MIME trees, not mail.
    "mimekit": (("UnitTests/TestData/messages/*",), ("UnitTests/TestData/mbox/*.mbox.txt",)),
    # test/emacs*.expected-output are rendered views, not mail.
    "notmuch": (("test/corpora/**/*",), ()),
    # yaml/ holds Ponymail's expected output.
    "ponymail-apache-lists": ((), ("corpus/*.mbox",)),
    # 8859-15-message-series/dir is a message too (the first of the series).
    "rt-request-tracker": (("t/data/emails/**/*",), ()),
    # sample_output_multipart (empty) and .gitattributes are not mail.
    "ruby-mail-gem": (("spec/fixtures/emails/*/*.eml",), ()),
    # the *.html replies and signature/ bodies are body-only fragments.
    "talon": (("tests/fixtures/standard_replies/*.eml", "tests/fixtures/*.eml"), ()),
}

# Folders with reply bodies only (no header block): nothing in them is a message.
BODY_ONLY = frozenset(
    {
        "crisp-email-reply-parser",
        "github-email-reply-parser",
        "mail-parser-reply",
        "zapier-email-reply-parser",
    }
)

# Files matched by LAYOUT that are not mail at all, so parse_message must raise ParseError.
NOT_MAIL: dict[str, str] = {
    "cpython-test-email/data/msg_19.txt": "a digest body without any header",
    "enmime/testdata/mail/erroneous.raw": "'// Not an RFC-822 Document', enmime expects failure",
    "flanker/tests/fixtures/messages/dkim/email.01": "empty file (purpose.01 says so)",
    "mail-parser-spamscope/mails/mail_outlook_1": "an Outlook .msg file (OLE2 binary)",
    "mimekit/UnitTests/TestData/mbox/unmunged.mbox.txt#0": (
        "body text after an unescaped 'From ' line; mailbox.mbox splits there, the point of"
        " this mimekit test"
    ),
    "rt-request-tracker/t/data/emails/lorem-ipsum": "plain lorem ipsum text, no header",
}


def _single_files(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    found = {p for pattern in patterns for p in folder.glob(pattern) if p.is_file()}
    return sorted(found)


def iter_corpus_messages(root: Path = CORPUS) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, raw_bytes)`` for every message in the corpus, in a stable order.

    Inside a test, skips it (with the path in the reason) when the corpus is absent.
    """
    if not root.is_dir():
        pytest.skip(f"shared mail corpus not found at {root} (see ../shared/corpus/README.md)")
    for folder_name, (single_globs, mbox_globs) in sorted(LAYOUT.items()):
        folder = root / folder_name
        if not folder.is_dir():
            continue
        for path in _single_files(folder, single_globs):
            yield path.relative_to(root).as_posix(), path.read_bytes()
        for path in _single_files(folder, mbox_globs):
            box = mailbox.mbox(path, create=False)
            try:
                # get_bytes() returns the message without its "From " separator line.
                for index, key in enumerate(box.iterkeys()):
                    yield f"{path.relative_to(root).as_posix()}#{index}", box.get_bytes(key)
            finally:
                box.close()
