"""Renderer.render keeps each template and its globals, flattened, after the first render.

Given templates rendered many times (an acknowledgement a message), when ``render`` is
called again, then it neither asks the Environment for the template nor walks the
template's ChainMap of globals, and what it renders is what Jinja's own ``new_context``
rendering gives, globals included.
"""

from __future__ import annotations

from collections import ChainMap
from pathlib import Path

import pytest
from jinja2 import TemplateError

from mailgw.outbound.render import Renderer

CONTEXT = {
    "ticket": {"number": "2026112710000123", "title": "Widgets", "queue": "support",
               "state": "new", "priority": 3},
    "article": {"subject": "Where are my widgets?", "from_addr": "ann@customer.test",
                "from_name": "Ann", "text": "Hello,\nwhere are they?\n"},
    "customer": "ann@customer.test", "tag": "[Ticket#2026112710000123]",
    "queue": {"name": "support", "address": "support@example.com"}, "reopened": False,
}


def _reference(renderer: Renderer, name: str, context: dict) -> tuple[str, str]:  # type: ignore[type-arg]
    """What render did before: Template.new_context on every call."""
    tmpl = renderer.env.get_template(f"{name}.j2")
    ctx = tmpl.new_context(context)
    subject = " ".join("".join(tmpl.blocks["subject"](ctx)).strip().split())
    return subject, "".join(tmpl.blocks["body"](ctx)).strip("\n") + "\n"


def test_a_template_is_loaded_once_and_its_globals_walked_once(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "t.j2").write_text("{% block subject %}Re: {{ article.subject }}{% endblock %}"
                                   "{% block body %}{{ tag }}{% endblock %}")
    renderer = Renderer(tmp_path)
    first = renderer.render("t", CONTEXT)
    loads, walks = [], []
    get_template = renderer.env.get_template
    monkeypatch.setattr(renderer.env, "get_template",
                        lambda *a, **kw: loads.append(a) or get_template(*a, **kw))
    iter_ = ChainMap.__iter__
    monkeypatch.setattr(ChainMap, "__iter__", lambda self: walks.append(1) or iter_(self))
    for _ in range(3):
        assert renderer.render("t", CONTEXT) == first
    assert loads == [] and walks == []


def test_rendering_is_jinjas_own_for_every_shipped_template():
    renderer = Renderer(Path(__file__).resolve().parents[1] / "templates")
    for name in ("ack_new", "ack_followup", "reject_closed"):
        for reopened in (False, True):
            context = {**CONTEXT, "reopened": reopened}
            got = renderer.render(name, context)
            assert (got.subject, got.body) == _reference(renderer, name, context)
            assert renderer.render(name, context) == got  # the kept template, again


def test_jinja_globals_are_still_seen(tmp_path: Path):
    (tmp_path / "g.j2").write_text(
        "{% block subject %}{{ range(3) | list | join(',') }}{% endblock %}"
        "{% block body %}{% set c = cycler('a', 'b') %}{{ c.next() }}{{ c.next() }}"
        "{% for n in namespace(x=2).x | string %}{{ n }}{% endfor %}{% endblock %}")
    renderer = Renderer(tmp_path)
    for _ in range(2):
        got = renderer.render("g", CONTEXT)
        assert (got.subject, got.body) == ("0,1,2", "ab2\n")
        assert (got.subject, got.body) == _reference(renderer, "g", CONTEXT)


def test_a_template_without_its_blocks_is_refused_every_time(tmp_path: Path):
    (tmp_path / "bad.j2").write_text("{% block subject %}x{% endblock %}")
    renderer = Renderer(tmp_path)
    for _ in range(2):
        with pytest.raises(TemplateError, match="needs a 'subject' and a 'body' block"):
            renderer.render("bad", CONTEXT)
