"""Make a customer's HTML safe to show to agents, and readable as plain text.

``sanitize_html`` keeps the structure of a mail (paragraphs, lists, tables, quotes, links)
and removes everything that can run code, load remote content, submit data or restyle the
agent's screen. It is an allow-list (bleach): what is not listed below is removed.
``html_to_text`` renders HTML as plain text for the text body, search and replies.

``article_html`` is the way to an article's HTML for showing or sending it (decision 32):
ingest keeps the HTML part only in the raw mail (``inbound_raw.raw``) and marks the article
``has_html``; the first reader sanitises it from there and caches it in ``body_html``. A
reader that must not write while it sanitises (``mailgw tickets show``: SQLite's one write
lock) takes its two halves, ``sanitised_from_raw`` in its read transaction, then
``cache_article_html`` in a short write of its own.
"""

from __future__ import annotations

import html as htmllib
import logging
import re
import threading
from html.parser import HTMLParser
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from mailgw.store.models import Article

__all__ = ["article_html", "cache_article_html", "html_to_text", "sanitised_from_raw", "sanitize_html"]

log = logging.getLogger(__name__)

# --- sanitize_html ------------------------------------------------------------------------

ALLOWED_TAGS = frozenset(
    {
        "a", "abbr", "acronym", "address", "b", "bdi", "bdo", "big", "blockquote", "br",
        "caption", "center", "cite", "code", "col", "colgroup", "dd", "del", "dfn", "div",
        "dl", "dt", "em", "font", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img",
        "ins", "kbd", "li", "mark", "ol", "p", "pre", "q", "s", "samp", "small", "span",
        "strike", "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead",
        "tr", "tt", "u", "ul", "var", "wbr",
    }
)  # fmt: skip
# Elements removed together with their content: their text is code, CSS, a page title or
# a fallback for an embedded object, never part of what the customer wrote.
DROPPED_WITH_CONTENT = frozenset(
    {"script", "style", "title", "template", "iframe", "object", "applet", "noembed",
     "noframes", "xml"}
)  # fmt: skip
_CELL = ["align", "valign", "width", "height", "colspan", "rowspan", "bgcolor", "nowrap"]
_GLOBAL = ["title", "lang", "dir"]
_LINK = re.compile(r"(?:https?|mailto):|#", re.IGNORECASE)
_INLINE_IMAGE = re.compile(r"cid:", re.IGNORECASE)


def _a_attribute(tag: str, name: str, value: str) -> bool:
    # A relative href would resolve against the help desk's own origin; only absolute
    # http(s)/mailto links and in-page anchors are kept. bleach's protocol check also runs.
    if name == "href":
        return bool(_LINK.match(value.strip()))
    return name == "name" or name in _GLOBAL


def _img_attribute(tag: str, name: str, value: str) -> bool:
    # Only images carried in the message itself (RFC 2392 cid: URLs): a remote image is a
    # tracking pixel that tells the sender when an agent opened the ticket.
    if name == "src":
        return bool(_INLINE_IMAGE.match(value.strip()))
    return name in ("alt", "title", "width", "height", "align", "border")


# No "style" attribute (CSS can overlay the agent UI or fetch remote URLs) and no event
# handlers: neither is listed, so both are dropped.
ALLOWED_ATTRIBUTES = {
    "*": _GLOBAL,
    "a": _a_attribute,
    "abbr": ["title"],
    "blockquote": ["cite", "type", *_GLOBAL],
    "col": ["span", "width", "align", "valign"],
    "colgroup": ["span", "width", "align", "valign"],
    "font": ["color", "face", "size", *_GLOBAL],
    "img": _img_attribute,
    "ol": ["start", "type", *_GLOBAL],
    "table": ["align", "width", "border", "cellpadding", "cellspacing", "bgcolor", *_GLOBAL],
    "td": [*_CELL, *_GLOBAL],
    "th": [*_CELL, "scope", *_GLOBAL],
    "tr": ["align", "valign", "bgcolor", *_GLOBAL],
    "ul": ["type", *_GLOBAL],
}
ALLOWED_PROTOCOLS = frozenset({"http", "https", "mailto", "cid"})


class _Sanitizer:
    """bleach's Cleaner, plus removal of DROPPED_WITH_CONTENT elements before filtering.

    bleach strips a disallowed tag but keeps its text, so a stylesheet or script would
    show up as text; those elements are parsed as elements here and cut from the tree.
    """

    def __init__(self) -> None:
        # Imported here: ingest needs html_to_text only, and bleach's import is heavy.
        from bleach import html5lib_shim
        from bleach.sanitizer import BleachSanitizerFilter

        self.filter = BleachSanitizerFilter
        self.parser = html5lib_shim.BleachHTMLParser(
            tags=ALLOWED_TAGS | DROPPED_WITH_CONTENT,
            strip=True,
            consume_entities=False,
            namespaceHTMLElements=False,
        )
        self.walker = html5lib_shim.getTreeWalker("etree")
        self.serializer = html5lib_shim.BleachHTMLSerializer(
            quote_attr_values="always",
            omit_optional_tags=False,
            escape_lt_in_attrs=True,
            resolve_entities=False,
            sanitize=False,
            alphabetical_attributes=False,
        )

    def clean(self, text: str) -> str:
        fragment = self.parser.parseFragment(text)
        _drop_elements(fragment, DROPPED_WITH_CONTENT)
        stream = self.filter(
            source=self.walker(fragment),
            allowed_tags=ALLOWED_TAGS,
            attributes=ALLOWED_ATTRIBUTES,
            allowed_protocols=ALLOWED_PROTOCOLS,
            strip_disallowed_tags=True,
            strip_html_comments=True,
        )
        return self.serializer.render(stream)


def _drop_elements(root, names: frozenset[str]) -> None:
    """Remove matching elements and their content, keeping the text that follows them."""
    for parent in list(root.iter()):
        previous = None
        for child in list(parent):
            if child.tag in names:
                if child.tail:
                    if previous is None:
                        parent.text = (parent.text or "") + child.tail
                    else:
                        previous.tail = (previous.tail or "") + child.tail
                parent.remove(child)
            else:
                previous = child


_local = threading.local()  # bleach's parser keeps state: one per thread


def sanitize_html(html: str) -> str:
    """Allow-listed HTML for display to agents. Never raises."""
    if not html:
        return ""
    try:
        sanitizer = getattr(_local, "sanitizer", None)
        if sanitizer is None:
            sanitizer = _local.sanitizer = _Sanitizer()
        return sanitizer.clean(html)
    except Exception:  # anything the HTML parser chokes on: show escaped text instead
        log.warning("HTML sanitiser failed; showing the text escaped instead", exc_info=True)
        _local.sanitizer = None
        return "<pre>" + htmllib.escape(html_to_text(html)) + "</pre>"


# --- article_html -------------------------------------------------------------------------


def article_html(session: Session, article: Article) -> str | None:
    """An article's sanitised HTML body, or None when it has none (decision 32).

    ``body_html`` is a cache: what it holds is sanitised and returned. Otherwise, for an
    article marked ``has_html``, the raw mail it came from (``inbound_raw.raw``, kept for
    good) is parsed again and its HTML part sanitised, as ingest did before decision 32, and the
    result is written to ``body_html`` through ``session`` (``cache_article_html``; the
    caller commits). An HTML part that sanitises to nothing is cached as "" and read as
    None. The raw mail gone, or not parsed: None, logged, nothing written.
    """
    if article.body_html is not None:
        return article.body_html or None
    html = sanitised_from_raw(session, article)
    if html is None:
        return None
    cache_article_html(session, article, html)
    return html or None


def sanitised_from_raw(session: Session, article: Article) -> str | None:
    """What ``article_html`` caches for an article whose cache is empty, computed without
    writing: its raw mail's HTML part sanitised ("" for an HTML part that sanitises to
    nothing, or no HTML part); None when there is nothing to cache (no HTML, the raw mail
    gone or not parsed: logged). A viewer computes this in its read transaction and writes
    the cache in a short one of its own: on SQLite, sanitising inside the write transaction
    held the one write lock for seconds on a large HTML mail (review, session 6)."""
    if not article.has_html or article.inbound_id is None:
        return None
    from sqlalchemy import select

    from mailgw.mail.parse import parse_message
    from mailgw.store.models import InboundRaw

    raw = session.scalar(select(InboundRaw.raw).where(InboundRaw.inbound_id == article.inbound_id))
    if raw is None:
        log.warning("article %s: its raw mail (inbound %s) is gone; no HTML to show",
                    article.id, article.inbound_id)
        return None
    try:
        html = parse_message(raw).html
    except Exception:  # ParseError: ingest parsed these bytes, so they were changed since
        log.warning("article %s: its raw mail (inbound %s) does not parse; no HTML to show",
                    article.id, article.inbound_id, exc_info=True)
        return None
    return (html or "").replace("\x00", "")  # as stored before: PostgreSQL text has no NUL


def cache_article_html(session: Session, article: Article | int, html: str) -> None:
    """Fill an article's empty ``body_html`` cache with ``html`` (from ``sanitised_from_raw``)
    through ``session``; the caller commits. A cache filled meanwhile is left as it is."""
    from sqlalchemy import update
    from sqlalchemy.orm.attributes import set_committed_value

    from mailgw.store.models import Article

    article_id = article if isinstance(article, int) else article.id
    session.execute(update(Article)
                    .where(Article.id == article_id, Article.body_html.is_(None))
                    .values(body_html=html)
                    .execution_options(synchronize_session=False))
    if not isinstance(article, int):
        set_committed_value(article, "body_html", html)


# --- html_to_text -------------------------------------------------------------------------

# Elements that start on a new line; those in _PARAGRAPHS also leave a blank line.
_BLOCKS = frozenset(
    {
        "address", "article", "aside", "blockquote", "caption", "center", "dd", "details",
        "dialog", "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form",
        "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav", "ol", "p",
        "pre", "section", "summary", "table", "tr", "ul",
    }
)  # fmt: skip
_PARAGRAPHS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "table"})
_CELLS = frozenset({"td", "th"})
_SKIPPED = DROPPED_WITH_CONTENT
_WHITESPACE = re.compile(r"[ \t\n\r\f\v]+")  # HTML whitespace; "\xa0" stays a hard space


class _TextExtractor(HTMLParser):
    """Collects text; line breaks are owed, not written, until more text follows."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # entities come out unescaped
        self.out: list[str] = []
        self.breaks = 0  # newlines owed before the next text
        self.bullet = ""  # list marker owed before the next text
        self.line_start = True
        self.skip = 0  # inside script/style/...
        self.pre = 0  # inside <pre>: whitespace is content

    def _block(self, tag: str) -> None:
        self.breaks = max(self.breaks, 2 if tag in _PARAGRAPHS else 1)

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in _SKIPPED:
            self.skip += 1
        elif tag == "br":
            self.breaks += 1
        elif tag in _BLOCKS:
            self._block(tag)
            self.pre += tag == "pre"
            self.bullet = "- " if tag == "li" else self.bullet
        elif tag in _CELLS and not (self.line_start or self.breaks):
            self.out.append(" ")

    def handle_startendtag(self, tag: str, attrs) -> None:
        if tag not in _SKIPPED:  # "<script/>" opens nothing
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED:
            self.skip = max(0, self.skip - 1)
        elif tag in _BLOCKS:
            self._block(tag)
            if tag == "pre":
                self.pre = max(0, self.pre - 1)

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        if not self.pre:
            data = _WHITESPACE.sub(" ", data)
            if self.line_start or self.breaks:
                data = data.lstrip(" ")
            if not data:
                return
        if self.breaks and self.out:
            self.out.append("\n" * self.breaks)
            self.line_start = True
        self.breaks = 0
        if self.bullet and self.line_start:
            self.out.append(self.bullet)
        self.bullet = ""
        self.out.append(data)
        self.line_start = data.endswith("\n")


def _tidy(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\xa0", " ").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_TAG = re.compile(r"<[^>]*>")


def html_to_text(html: str) -> str:
    """Readable plain text from HTML. Never raises."""
    if not html:
        return ""
    extractor = _TextExtractor()
    try:
        extractor.feed(html)
        extractor.close()
        text = "".join(extractor.out)
    except Exception:  # html.parser is lenient, but not guaranteed never to assert
        text = htmllib.unescape(_TAG.sub(" ", html))
    return _tidy(text)
