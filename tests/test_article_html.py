"""HTML bodies are sanitised when first needed, not at ingest (decision 32), on both stores.

Ingest stores an article's HTML only in its raw mail and marks it ``has_html``;
``mailgw.mail.sanitize.article_html`` sanitises it from there (bleach, the same allow-list as
before) and caches it in ``body_html``; ``mailgw tickets show --json`` / ``--html`` use it.
"""

from __future__ import annotations

import json
import logging

import pytest
from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from mailgw.mail import sanitize
from mailgw.mail.parse import parse_message
from mailgw.mail.sanitize import article_html, sanitize_html
from mailgw.store import models as m
from tests.helpers import Harness

HTML = (
    '<html><head><style>body { color: red }</style><script>alert("x")</script></head><body>'
    '<p onclick="steal()">The printer in <b>room 4</b> is on fire.</p>'
    '<img src="https://tracker.example/pixel.gif"><img src="cid:logo@c">'
    '<a href="javascript:alert(1)">click</a> <a href="https://example.org/x">manual</a>'
    "</body></html>"
)


def html_mail(html: str = HTML, subject: str = "Fire", msgid: str = "h1@customer.test",
              text: str | None = None, sender: str = "carol@customer.test") -> bytes:
    head = (f"From: Carol <{sender}>\r\nTo: support@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: <{msgid}>\r\nMIME-Version: 1.0\r\n")
    if text is None:
        return (head + "Content-Type: text/html; charset=utf-8\r\n\r\n" + html + "\r\n").encode()
    return (head + 'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
            "--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text + "\r\n"
            "--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html + "\r\n--b--\r\n"
            ).encode()


@pytest.fixture
def hx(home):  # type: ignore[no-untyped-def]
    h = Harness(home)
    yield h
    h.close()


@pytest.fixture
def sanitised(monkeypatch):  # type: ignore[no-untyped-def]
    """Counts the HTML parts bleach sanitises."""
    calls: list[str] = []
    clean = sanitize._Sanitizer.clean

    def counting(self, text):  # type: ignore[no-untyped-def]
        calls.append(text)
        return clean(self, text)

    monkeypatch.setattr(sanitize._Sanitizer, "clean", counting)
    return calls


def _customer_article(hx: Harness) -> m.Article:
    [article] = [a for a in hx.articles() if a.direction == "in"]
    return article


def _show(hx: Harness, article_id: int) -> str | None:
    with Session(hx.engine) as s, s.begin():
        return article_html(s, s.get(m.Article, article_id))


def _no_parsing(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def fail(raw):  # type: ignore[no-untyped-def]
        raise AssertionError("the raw mail was parsed again")

    monkeypatch.setattr("mailgw.mail.parse.parse_message", fail)


def test_ingest_stores_no_html_and_runs_no_sanitiser(hx, sanitised):
    hx.put(html_mail(), html_mail(text="Plain version.", msgid="h2@customer.test",
                                  subject="Two parts"))
    hx.drain()
    assert sanitised == []
    arts = [a for a in hx.articles() if a.direction == "in"]
    assert [(a.has_html, a.body_html) for a in arts] == [(True, None), (True, None)]
    # The text still comes from the HTML when there is no plain part, scripts left out.
    assert "room 4 is on fire" in arts[0].body_text and "alert" not in arts[0].body_text
    assert arts[1].body_text.strip() == "Plain version."
    # Our own mail has no HTML to sanitise either.
    assert all(not a.has_html for a in hx.articles() if a.direction == "out")


def test_first_view_sanitises_from_the_raw_mail_and_caches(hx, sanitised, monkeypatch):
    hx.put(html_mail())
    hx.drain()
    article = _customer_article(hx)
    html = _show(hx, article.id)
    assert len(sanitised) == 1
    assert html is not None and "room 4" in html and "manual" in html
    for gone in ("script", "alert", "onclick", "steal", "style", "color: red",
                 "tracker.example", "javascript"):
        assert gone not in html
    assert 'src="cid:logo@c"' in html
    # Exactly what ingest stored before decision 32: the same parse, the same sanitiser.
    assert html == sanitize_html(parse_message(html_mail()).raw_html)
    assert _customer_article(hx).body_html == html  # cached, committed
    _no_parsing(monkeypatch)
    assert _show(hx, article.id) == html
    assert len(sanitised) == 2  # the comparison above; the second view sanitised nothing


def test_article_without_html(hx, monkeypatch):
    hx.put(b"From: carol@customer.test\r\nTo: support@example.com\r\nSubject: plain\r\n\r\n"
           b"Just text.\r\n")
    hx.drain()
    article = _customer_article(hx)
    assert (article.has_html, article.body_html) == (False, None)
    _no_parsing(monkeypatch)
    assert _show(hx, article.id) is None
    assert _customer_article(hx).body_html is None


def test_html_that_sanitises_to_nothing_is_cached_as_none(hx, monkeypatch):
    hx.put(html_mail("<script>alert(1)</script><style>p {}</style>", text="Plain."))
    hx.drain()
    article = _customer_article(hx)
    assert _show(hx, article.id) is None
    assert _customer_article(hx).body_html == ""  # sanitised: nothing; not parsed again
    _no_parsing(monkeypatch)
    assert _show(hx, article.id) is None


def test_an_article_stored_before_migration_0018_keeps_its_body_html(hx, monkeypatch):
    hx.put(html_mail())
    hx.drain()
    article = _customer_article(hx)
    with hx.engine.begin() as c:  # as 0018 leaves older rows: sanitised HTML, has_html false
        c.execute(update(m.Article).where(m.Article.id == article.id)
                  .values(body_html="<p>stored at ingest</p>", has_html=False))
    _no_parsing(monkeypatch)
    assert _show(hx, article.id) == "<p>stored at ingest</p>"


def test_raw_mail_gone_or_unparseable_shows_nothing_and_caches_nothing(hx, caplog):
    hx.put(html_mail(), html_mail(msgid="h2@customer.test", subject="Other"))
    hx.drain()
    first, second = [a for a in hx.articles() if a.direction == "in"]
    with hx.engine.begin() as c:
        c.execute(delete(m.InboundRaw).where(m.InboundRaw.inbound_id == first.inbound_id))
        c.execute(update(m.InboundRaw).where(m.InboundRaw.inbound_id == second.inbound_id)
                  .values(raw=b"\x00\x01 not mail at all"))
    with caplog.at_level(logging.WARNING, logger="mailgw.mail.sanitize"):
        assert _show(hx, first.id) is None
        assert _show(hx, second.id) is None
    assert "is gone" in caplog.text and "does not parse" in caplog.text
    assert [a.body_html for a in hx.articles() if a.direction == "in"] == [None, None]


def test_a_quarantined_inbound_row_still_has_its_raw_mail(hx):
    # The view reads the raw mail whatever became of its row (a later replay, a manual
    # quarantine): only the bytes matter.
    hx.put(html_mail())
    hx.drain()
    article = _customer_article(hx)
    with hx.engine.begin() as c:
        c.execute(update(m.Inbound).where(m.Inbound.id == article.inbound_id)
                  .values(state="quarantined", error="by hand"))
    html = _show(hx, article.id)
    assert html is not None and "room 4" in html and "script" not in html


def test_reply_split_from_the_html_as_received(hx, sanitised):
    # No plain part and the history only in the markup: split from the raw HTML, unsanitised.
    hx.put(html_mail('<div dir="ltr">Still broken.</div><div class="gmail_quote">'
                     "On Mon, Bob wrote:<blockquote>Have you tried turning it off?"
                     "</blockquote></div>"))
    hx.drain()
    article = _customer_article(hx)
    assert sanitised == []
    assert article.visible_text.strip() == "Still broken."
    assert "turning it off" in (article.quoted_text or "")


def test_parsed_mail_html_is_sanitised_on_first_access_only(sanitised):
    mail = parse_message(html_mail())
    assert sanitised == []
    assert "<script>" in mail.raw_html
    assert mail.html == sanitize_html(mail.raw_html) and "script" not in mail.html
    assert mail.html is mail.html
    assert len(sanitised) == 2  # mail.html once, the comparison once
    assert parse_message(b"From: a@b\r\nSubject: x\r\n\r\ntext\r\n").html is None


def test_tickets_show_json_and_html(hx, sanitised):
    hx.put(html_mail())
    hx.drain()
    article = _customer_article(hx)
    [ticket] = hx.tickets()
    text = hx.home.cli("tickets", "show", ticket.number, check=True).stdout.decode()
    assert "room 4 is on fire" in text and "html:" not in text
    assert _customer_article(hx).body_html is None  # not needed: not sanitised
    shown = json.loads(hx.home.cli("tickets", "show", ticket.number, "--json",
                                   check=True).stdout)
    arts = {a["id"]: a for a in shown["articles"]}
    assert list(arts[article.id])[-1] == "html"  # appended; the other keys as before
    assert {"id", "text", "visible_text", "attachments", "internal", "agent"} <= set(arts[article.id])
    html = arts[article.id]["html"]
    assert "room 4" in html and "script" not in html and "onclick" not in html
    assert all(a["html"] is None for a in shown["articles"] if a["direction"] == "out")
    assert _customer_article(hx).body_html == html  # cached by the first view
    text = hx.home.cli("tickets", "show", ticket.number, "--html", check=True).stdout.decode()
    assert "   html:\n   | " in text and "<b>room 4</b>" in text and "   html: none" in text


def test_agent_note_in_html_is_shown_sanitised(home):
    from mailgw.agent_mail.tokens import make_address
    from tests.test_agent_mail import outgoing, setup

    h = setup(home)
    try:
        h.put(html_mail(text="Room 4 is burning."))
        h.drain()
        [ticket] = h.tickets()
        [notification] = outgoing(h, "alice@agents.test")
        comment = make_address(h.settings, h.settings.queue("support"), "c",
                               h.settings.agent("alice"), ticket.id)
        raw = html_mail('<p>Known <i>customer</i>.</p><script>alert(2)</script>',
                        subject="Re: Fire", msgid="note@agents.test", text="Known customer.",
                        sender="alice@agents.test").replace(
            b"To: support@example.com", f"To: {comment}".encode())
        h.put(raw, rcpt=comment, mail_from="alice@agents.test")
        h.drain()
        [note] = [a for a in h.articles() if a.sender_type == "agent"]
        assert note.internal and note.has_html and note.body_html is None
        html = _show(h, note.id)
        assert html == "<p>Known <i>customer</i>.</p>"
        assert notification["Reply-To"]  # the customer's article's notification went out
    finally:
        h.close()


def test_tickets_show_json_works_for_a_role_that_may_only_read(hx):
    # Review finding: the first view wrote the cache in the transaction that sanitised, and
    # a store the command may only read (a SELECT-only PostgreSQL role) made `tickets show
    # --json` exit 1. Now the HTML is sanitised in the read transaction and the cache
    # written afterwards, best effort. (It also keeps SQLite's write lock free while mail
    # is parsed: the write is one short UPDATE an article.)
    import uuid

    import psycopg

    if not hx.home.store_url.startswith("postgresql"):
        pytest.skip("roles are PostgreSQL's")
    hx.put(html_mail())
    hx.drain()
    article = _customer_article(hx)
    [ticket] = hx.tickets()
    schema = hx.home.store_url.split("search_path%3D")[1]
    role = f"ro_{uuid.uuid4().hex[:10]}"
    admin = "postgresql://postgres@127.0.0.1:5432/test"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
        conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role}")
    try:
        env = {**hx.home.env(), "MAILGW_STORE_URL": hx.home.store_url.replace("postgres@",
                                                                               f"{role}@")}
        import subprocess
        import sys

        proc = subprocess.run([sys.executable, "-m", "mailgw", "tickets", "show", ticket.number,
                               "--json"], env=env, capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()
        [shown] = [a for a in json.loads(proc.stdout)["articles"] if a["id"] == article.id]
        assert "room 4" in shown["html"] and "script" not in shown["html"]
        assert b"not cached" in proc.stderr
        assert _customer_article(hx).body_html is None  # nothing written
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM {role}")
            conn.execute(f"REVOKE USAGE ON SCHEMA {schema} FROM {role}")
            conn.execute(f"DROP ROLE {role}")
