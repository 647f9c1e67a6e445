"""Filter decisions applied by the worker, on both stores, and ``mailgw explain``."""

from __future__ import annotations

import json
import textwrap

import pytest

from mailgw.filters.loader import load_pipeline
from mailgw.process import Context
from tests.helpers import Harness, mail


class FilterHarness(Harness):
    def __init__(self, home, rules: str):  # type: ignore[no-untyped-def]
        super().__init__(home)
        self.set_rules(rules)
        self.worker.context = lambda: Context(self.settings, self.renderer, self.pipeline)

    def set_rules(self, rules: str) -> None:
        (self.home.path / "filters" / "50-test.yaml").write_text(textwrap.dedent(rules))
        self.settings = self.home.settings()
        self.pipeline = load_pipeline(self.home.path / "filters", self.settings,
                                      self.home.path / "templates")


RULES = """
    rules:
      - name: billing-words
        when: {subject: {regex: '(?i)invoice (?P<no>\\d+)'}}
        then:
          queue: billing
          type: service_request
          service: invoicing
          category: finance
          tags: [invoice]
          fields: {invoice: "{match.no}"}
          company: "Customer Ltd"
          urgency: high
          impact: low
      - name: newsletter
        when: {subject: newsletter}
        then: {ignore: true}
      - name: abuse
        when: {sender_domain: {equals: abuse.test}}
        then: {reject: true}
      - name: quiet
        when: {subject: FYI}
        then: {auto_response: false}
      - name: close-thanks
        when: {follow_up: true, subject: {regex: '(?i)^(re: )?thanks'}}
        then: {state: closed, tags: [thanked]}
"""


@pytest.fixture
def fx(home):  # type: ignore[no-untyped-def]
    h = FilterHarness(home, RULES)
    yield h
    h.close()


def test_decision_sets_ticket_fields_and_trace(fx):
    fx.put(mail("Invoice 4711 is wrong", msgid="i1@c"))
    fx.drain()
    [t] = fx.tickets()
    assert (t.queue, t.type, t.service, t.category, t.company) == (
        "billing", "service_request", "invoicing", "finance", "Customer Ltd")
    assert (t.tags, t.custom_fields, t.urgency, t.impact, t.priority) == (
        ["invoice"], {"invoice": "4711"}, "high", "low", 3)  # matrix: high x low = 3
    [art] = [a for a in fx.articles(t.id) if a.direction == "in"]
    tr = art.filter_trace
    assert tr["matched"][0]["rule"] == "billing-words"
    assert tr["matched"][0]["changes"]["queue"] == ["support", "billing"]
    assert "newsletter" in tr["not_matched"] and "spam-certain" in tr["not_matched"]
    [ev] = fx.events("ticket_created")
    assert ev.data["queue"] == "billing"


def test_ignore_stores_the_mail_without_ticket_or_reply(fx):
    [iid] = fx.put(mail("Our newsletter", msgid="n1@c"))
    fx.drain()
    assert fx.tickets() == [] and fx.outbox() == []
    row = fx.inbound(iid)
    assert row.state == "done" and row.ticket_id is None and b"newsletter" in row.raw
    [ev] = fx.events("filter_ignored")
    assert ev.data["rule"] == "newsletter" and ev.inbound_id == iid
    assert ev.data["trace"]["matched"][0]["rule"] == "newsletter"
    out = fx.home.cli("explain", "--inbound", str(iid), check=True).stdout.decode()
    assert f"inbound {iid}: done" in out
    assert "ignored by rule 'newsletter': stored, no ticket, no reply" in out
    assert "rule MATCH newsletter" in out
    assert fx.home.cli("explain").returncode == 2  # neither a ticket nor --inbound


def test_reject_stores_without_ticket_or_bounce(fx):
    [iid] = fx.put(mail("hello", sender="x@abuse.test"), mail_from="x@abuse.test")
    fx.drain()
    assert fx.tickets() == [] and fx.outbox() == []
    assert fx.inbound(iid).state == "done"
    [ev] = fx.events("filter_rejected")
    assert ev.data["rule"] == "abuse"


def test_auto_response_suppressed_or_chosen(fx):
    fx.put(mail("FYI: the report", msgid="f1@c"))
    fx.drain()
    assert fx.outbox() == []
    [ev] = fx.events("auto_response_suppressed")
    assert ev.data["reason"] == "filter rule 'quiet' suppresses it"
    (fx.home.path / "templates" / "ack_billing.j2").write_text(
        "{% block subject %}Billing got it{% endblock %}{% block body %}"
        "Invoice {{ ticket.number }}{% endblock %}")
    fx.set_rules(RULES + """
      - name: billing-template
        when: {queue: [billing]}
        then: {auto_response: {template: ack_billing}}
    """)
    fx.put(mail("invoice 12 missing", msgid="f2@c"))
    fx.drain()
    [out] = fx.outbox()
    assert b"Billing got it" in out.raw
    assert [e.data["template"] for e in fx.events("auto_response_queued")] == ["ack_billing"]


def test_follow_up_rules_change_existing_ticket(fx):
    fx.put(mail("Printer", msgid="p1@c"))
    fx.drain()
    fx.put(mail("Re: thanks, works now", msgid="p2@c", In_Reply_To="<p1@c>"))
    fx.drain()
    [t] = fx.tickets()
    assert (t.state, t.tags) == ("closed", ["thanked"]) and t.closed_at is not None
    [ev] = fx.events("filters_applied")
    assert ev.data["changes"]["state"] == ["new", "closed"]
    assert ev.data["new_ticket"] is False


def test_explain_shows_rules_assignment_and_auto_response(fx):
    data = fx.home.config()
    data["agents"] = [{"name": "carol", "queues": ["billing"]}]
    data["queues"][1]["assignment"] = {"strategy": "round_robin"}
    fx.home.write_config(data)
    fx.set_rules(RULES)
    fx.put(mail("Invoice 99 twice", msgid="e1@c"))
    fx.drain()
    [t] = fx.tickets()
    assert t.owner == "carol"
    proc = fx.home.cli("explain", t.number, check=True)
    out = proc.stdout.decode()
    assert f"Ticket#{t.number}" in out
    assert "rule MATCH billing-words" in out and "queue: 'support' -> 'billing'" in out
    assert "rules not matched:" in out and "newsletter" in out
    assert "assignment: carol via round_robin" in out
    assert "auto-response: ack_new to alice@customer.test" in out
    proc = fx.home.cli("explain", "--json", f"[Ticket#{t.number}]", check=True)
    j = json.loads(proc.stdout)
    assert j["owner"] == "carol" and j["tags"] == ["invoice"]
    [msg] = j["messages"]
    assert msg["filters"]["matched"][0]["rule"] == "billing-words"
    assert msg["assignment"]["strategy"] == "round_robin"
    assert msg["auto_response"][0]["template"] == "ack_new"
    assert fx.home.cli("explain", "19990101999").returncode == 1


def test_follow_up_to_another_queue_address_stays_where_a_rule_put_it(fx):
    fx.put(mail("Invoice 5 wrong", msgid="q1@c"))
    fx.drain()
    # the customer answers via the support address; no rule moves the ticket
    fx.put(mail("Re: more on it", msgid="q2@c", In_Reply_To="<q1@c>"))
    fx.drain()
    [t] = fx.tickets()
    assert t.queue == "billing"
    assert [e.data["changes"] for e in fx.events("filters_applied")][1:] == []
