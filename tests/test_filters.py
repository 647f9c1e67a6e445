"""The filter engine on its own: every kind of condition and action on inline messages and
corpus messages, captures, stop, the trace, and the exact errors of invalid files."""

from __future__ import annotations

import json
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailgw.filters.engine import MessageView
from mailgw.filters.loader import FilterError, load_pipeline
from mailgw.filters.model import json_schema
from mailgw.mail.parse import parse_message
from mailgw.settings import Settings
from tests.corpus import CORPUS
from tests.helpers import mail

ROOT = Path(__file__).resolve().parents[1]


def settings(**extra) -> Settings:  # type: ignore[no-untyped-def]
    data = {
        "queues": [{"name": "support", "addresses": ["support@example.com"]},
                   {"name": "billing", "addresses": ["billing@example.com"]},
                   {"name": "security", "addresses": ["security@example.com"]}],
        "agents": [{"name": "alice", "queues": ["support"]}],
        "calendars": [{"name": "office", "timezone": "Europe/Berlin",
                       "mon": ["09:00-17:00"], "tue": ["09:00-17:00"], "wed": ["09:00-17:00"],
                       "thu": ["09:00-17:00"], "fri": ["09:00-17:00"],
                       "holidays": ["2026-12-25"]}],
    }
    data.update(extra)
    return Settings.model_validate(data)


def pipeline(tmp_path: Path, text: str, name: str = "10-rules.yaml", **kw):  # type: ignore[no-untyped-def]
    d = tmp_path / "filters"
    d.mkdir(exist_ok=True)
    (d / name).write_text(textwrap.dedent(text))
    tpl = tmp_path / "templates"
    tpl.mkdir(exist_ok=True)
    for t in ("ack_new", "ack_followup", "reject_closed", "ack_vip"):
        (tpl / f"{t}.j2").write_text("{% block subject %}x{% endblock %}{% block body %}y{% endblock %}")
    return load_pipeline(d, settings(**kw), tpl)


def errors(tmp_path: Path, text: str, **kw) -> list[str]:  # type: ignore[no-untyped-def]
    with pytest.raises(FilterError) as exc:
        pipeline(tmp_path, text, **kw)
    return exc.value.errors


def run(p, raw: bytes, queue: str = "support", **kw):  # type: ignore[no-untyped-def]
    return p.run(MessageView(parse_message(raw), queue=queue, **kw))


def with_attachment(name: str, ctype: str, data: bytes, **headers: str) -> bytes:
    from email.message import EmailMessage

    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "alice@customer.test", "support@example.com", "files"
    for k, v in headers.items():
        m[k.replace("_", "-")] = v
    m.set_content("see attached")
    maintype, subtype = ctype.split("/")
    m.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return m.as_bytes()


# --- conditions -----------------------------------------------------------------------------

def test_header_conditions_regex_contains_equals_exists(tmp_path):
    p = pipeline(tmp_path, """
        rules:
          - name: by-regex
            when: {header: {name: X-Ticket-Source, regex: '^monitor-(\\d+)$'}}
            then: {tags: [monitor]}
          - name: by-contains
            when: {header: {name: x-mailer, contains: OUTLOOK}}
            then: {tags: [outlook]}
          - name: by-equals
            when: {header: {name: X-Priority, equals: "1"}}
            then: {urgency: high}
          - name: has-header
            when: {header: {name: X-Customer-Id, exists: true}}
            then: {tags: [known-customer]}
          - name: lacks-header
            when: {header: {name: X-Customer-Id, exists: false}}
            then: {tags: [anonymous]}
    """)
    d, t = run(p, mail("hi", X_Ticket_Source="monitor-42", X_Mailer="Microsoft Outlook 16",
                       X_Priority="1"))
    assert d.tags == ["monitor", "outlook", "anonymous"]
    assert d.urgency == "high"
    assert t.matched == ["by-regex", "by-contains", "by-equals", "lacks-header"]
    d, t = run(p, mail("hi", X_Ticket_Source="monitor-x", X_Priority="12", X_Customer_Id="7"))
    assert d.tags == ["known-customer"] and d.urgency is None
    assert [r.name for r, ok, _ in t.results if not ok] == ["by-regex", "by-contains",
                                                            "by-equals", "lacks-header"]


def test_sender_domain_recipient_subject_body(tmp_path):
    p = pipeline(tmp_path, """
        rules:
          - name: sender
            when: {sender: {equals: Boss@BigCorp.example}}
            then: {tags: [boss]}
          - name: domain
            when: {sender_domain: {one_of: [bigcorp.example, other.example]}}
            then: {company: BigCorp}
          - name: cc-to-security
            when: {recipient: {equals: security@example.com}}
            then: {queue: security}
          - name: subject-shorthand
            when: {subject: printer}
            then: {category: hardware}
          - name: body-case-sensitive
            when: {body: {contains: URGENT, case_sensitive: true}}
            then: {urgency: high}
    """)
    raw = mail("The PRINTER is on fire", body="urgent please", sender="boss@bigcorp.example",
               Cc="Security <security@example.com>")
    d, _ = run(p, raw)
    assert (d.tags, d.company, d.queue, d.category, d.urgency) == (
        ["boss"], "BigCorp", "security", "hardware", None)
    d, t = run(p, mail("Paper jam", body="URGENT", sender="someone@else.example"))
    assert (d.tags, d.company, d.queue, d.category, d.urgency) == (
        [], None, "support", None, "high")
    assert t.matched == ["body-case-sensitive"]


def test_envelope_recipient_and_sender_count(tmp_path):
    p = pipeline(tmp_path, """
        rules:
          - name: envelope
            when: {recipient: {regex: '^support\\+(?P<prio>[1-5])@'}}
            then: {fields: {requested: "{match.prio}"}}
    """)
    d, _ = run(p, mail("x"), rcpt_tos=["support+2@example.com"])
    assert d.fields == {"requested": "2"}


def test_attachment_name_type_size(tmp_path):
    p = pipeline(tmp_path, """
        rules:
          - name: invoice-pdf
            when:
              attachment:
                name: {regex: '(?i)^invoice-(\\d+)\\.pdf$'}
                type: {equals: application/pdf}
            then: {queue: billing, fields: {invoice: "{match.1}"}}
          - name: big
            when: {attachment: {min_size: 1000}}
            then: {tags: [big]}
          - name: small
            when: {attachment: {max_size: 999}}
            then: {tags: [small]}
    """)
    d, _ = run(p, with_attachment("Invoice-2026.pdf", "application/pdf", b"%PDF" + b"x" * 2000))
    assert (d.queue, d.fields, d.tags) == ("billing", {"invoice": "2026"}, ["big"])
    d, _ = run(p, with_attachment("invoice-7.txt", "text/plain", b"tiny"))
    assert (d.queue, d.fields, d.tags) == ("support", {}, ["small"])
    d, _ = run(p, mail("no attachment"))
    assert d.tags == []


def test_spam_flag_and_score(tmp_path):
    p = pipeline(tmp_path, """
        rules:
          - name: flagged
            when: {spam: {flag: true}}
            then: {tags: [spam]}
          - name: high-score
            when: {spam: {score_above: 5}}
            then: {priority: 5}
    """)
    d, _ = run(p, mail("buy", X_Spam_Flag="YES", X_Spam_Score="7.3"))
    assert (d.tags, d.priority) == (["spam"], 5)
    d, _ = run(p, mail("buy", X_Spam_Status="No, score=5.1 required=5.0"))
    assert (d.tags, d.priority) == ([], 5)
    d, _ = run(p, mail("buy", X_Spam_Flag="NO", X_Spam_Score="5.0"))
    assert (d.tags, d.priority) == ([], None)  # 5.0 is not above 5


def test_time_weekday_hours_and_calendar(tmp_path):
    p = pipeline(tmp_path, """
        rules:
          - name: weekend-utc
            when: {time: {weekdays: [sat, sun]}}
            then: {tags: [weekend]}
          - name: night-utc
            when: {time: {between: "22:00-24:00"}}
            then: {tags: [late]}
          - name: office-closed
            when: {time: {calendar: office, working_hours: false}}
            then: {tags: [out-of-hours]}
          - name: holiday
            when: {time: {calendar: office, holiday: true}}
            then: {tags: [holiday]}
    """)
    at = lambda s: datetime.fromisoformat(s)  # noqa: E731
    # Thursday 2026-11-26 08:30 UTC is 09:30 in Berlin: office open.
    d, _ = run(p, mail("x"), now=at("2026-11-26T08:30:00+00:00"))
    assert d.tags == []
    # 16:30 UTC is 17:30 in Berlin: closed.
    d, _ = run(p, mail("x"), now=at("2026-11-26T16:30:00+00:00"))
    assert d.tags == ["out-of-hours"]
    d, _ = run(p, mail("x"), now=at("2026-11-28T23:00:00+00:00"))  # Saturday night
    assert d.tags == ["weekend", "late", "out-of-hours"]
    d, _ = run(p, mail("x"), now=at("2026-12-25T10:00:00+00:00"))  # Friday, a holiday
    assert d.tags == ["out-of-hours", "holiday"]


def test_follow_up_ticket_state_and_queue(tmp_path):
    p = pipeline(tmp_path, """
        rules:
          - name: new-only
            when: {follow_up: false}
            then: {tags: [new]}
          - name: reply-to-closed-billing
            when: {ticket_state: [closed], ticket_queue: [billing]}
            then: {state: open, tags: [reopened-billing]}
          - name: in-billing-now
            when: {queue: [billing]}
            then: {tags: [billing]}
    """)
    d, _ = run(p, mail("x"))
    assert d.tags == ["new"] and d.state is None
    d, _ = run(p, mail("Re: x"), ticket_state="closed", ticket_queue="billing", queue="billing")
    assert (d.tags, d.state) == (["reopened-billing", "billing"], "open")
    d, _ = run(p, mail("Re: x"), ticket_state="open", ticket_queue="billing")
    assert d.tags == []


def test_all_any_not_compose(tmp_path):
    p = pipeline(tmp_path, """
        rules:
          - name: composed
            when:
              all:
                - any:
                    - subject: {regex: '(?i)server'}
                    - body: {regex: '(?i)server'}
                - not: {sender_domain: {equals: example.com}}
            then: {type: incident}
    """)
    assert run(p, mail("Server down", sender="a@customer.test"))[0].type == "incident"
    assert run(p, mail("Hi", body="the server", sender="a@customer.test"))[0].type == "incident"
    assert run(p, mail("Server down", sender="me@example.com"))[0].type is None
    assert run(p, mail("Hi", sender="a@customer.test"))[0].type is None


# --- actions, captures, stop, trace -----------------------------------------------------------

def test_every_action_and_named_and_numbered_captures(tmp_path):
    p = pipeline(tmp_path, """
        rules:
          - name: everything
            when:
              subject: {regex: '^\\[(?P<svc>[A-Za-z]+)\\] (\\w+)'}
            then:
              queue: billing
              priority: 2
              type: problem
              service: "{match.svc}"
              category: "cat-{match.2}"
              tags: ["svc-{match.svc}", plain]
              fields: {word: "{match.2}", count: 3, flag: true}
              customer: "vip-{match.svc}@example.com"
              company: ACME
              owner: alice
              state: pending
              auto_response: {template: ack_vip}
          - name: drop-tag
            then: {remove_tags: [plain]}
    """)
    d, t = run(p, mail("[Mail] outage in the west"))
    assert (d.queue, d.priority, d.type, d.service, d.category) == (
        "billing", 2, "problem", "Mail", "cat-outage")
    assert d.tags == ["svc-Mail"]
    assert d.fields == {"word": "outage", "count": 3, "flag": True}
    assert (d.customer, d.company, d.owner, d.state, d.auto_response) == (
        "vip-Mail@example.com", "ACME", "alice", "pending", "ack_vip")
    trace = t.as_json()
    assert trace["matched"][0]["changes"]["queue"] == ["support", "billing"]
    assert trace["matched"][1]["changes"]["tags"] == [["svc-Mail", "plain"], ["svc-Mail"]]
    assert d.set_by["tags"] == "drop-tag" and d.set_by["queue"] == "everything"


def test_ignore_reject_suppress(tmp_path):
    p = pipeline(tmp_path, """
        rules:
          - name: newsletter
            when: {subject: newsletter}
            then: {ignore: true}
          - name: abuse
            when: {sender_domain: {equals: spammer.test}}
            then: {reject: true}
          - name: quiet
            when: {subject: FYI}
            then: {auto_response: false}
    """)
    assert run(p, mail("Our newsletter"))[0].ignore
    assert run(p, mail("hi", sender="x@spammer.test"))[0].reject
    d, _ = run(p, mail("FYI: done"))
    assert d.auto_response is False and not d.ignore and not d.reject


def test_stop_and_the_trace_of_unrun_rules(tmp_path):
    p = pipeline(tmp_path, """
        rules:
          - {name: a, when: {subject: x}, then: {tags: [a]}}
          - {name: b, when: {subject: y}, then: {tags: [b]}, stop: true}
          - {name: c, then: {tags: [c]}}
          - {name: d, then: {tags: [d]}, enabled: false}
    """)
    d, t = run(p, mail("y"))
    assert d.tags == ["b"]
    j = t.as_json()
    assert j["not_matched"] == ["a"] and j["stopped_by"] == "b" and j["not_evaluated"] == ["c"]
    d, t = run(p, mail("z"))
    assert d.tags == ["c"]  # the disabled rule d never runs


def test_priority_from_urgency_and_impact_matrix(tmp_path):
    text = """
        rules:
          - {name: u, when: {subject: urgent}, then: {urgency: high}}
          - {name: i, when: {subject: everyone}, then: {impact: high}}
          - {name: low, when: {subject: whenever}, then: {urgency: low, impact: low}}
    """
    p = pipeline(tmp_path, text)
    assert run(p, mail("urgent: everyone is down"))[0].priority == 1
    assert run(p, mail("urgent"))[0].priority == 2  # high x medium
    assert run(p, mail("whenever"))[0].priority == 5
    assert run(p, mail("nothing"))[0].priority is None  # the queue default applies later
    custom = {"matrix": {lvl: {"high": 2, "medium": 2, "low": 2}
                         for lvl in ("high", "medium", "low")}}
    p = pipeline(tmp_path, text, priority=custom)
    assert run(p, mail("urgent: everyone is down"))[0].priority == 2


def test_rules_run_in_file_name_order(tmp_path):
    pipeline(tmp_path, "rules: [{name: second, then: {category: second}}]\n", name="20-b.yaml")
    p = pipeline(tmp_path, "rules: [{name: first, then: {category: first}}]\n",
                 name="10-a.yaml")
    d, t = run(p, mail("x"))
    assert [r.name for r in p.rules] == ["first", "second"] and d.category == "second"


def test_corpus_messages(tmp_path):
    p = pipeline(tmp_path, """
        rules:
          - name: bounce
            when: {sender: {regex: '(?i)^mailer-daemon@'}}
            then: {ignore: true}
          - name: forwarded-mail
            when: {attachment: {type: {equals: message/rfc822}, name: {regex: '\\.eml$'}}}
            then: {tags: [forwarded]}
          - name: spam-status-yes
            when: {spam: {flag: true}}
            then: {tags: [spam]}
          - name: negative-score
            when: {not: {spam: {score_above: 0}}}
            then: {tags: [not-spam-scored]}
    """)
    rt = CORPUS / "rt-request-tracker/t/data/emails/email-file-attachment.eml"
    if not CORPUS.is_dir():
        pytest.skip(f"shared mail corpus not found at {CORPUS}")
    d, _ = run(p, rt.read_bytes())
    assert d.tags == ["forwarded", "not-spam-scored"]  # X-Spam-Score: -2.449, flag NO
    bad_time = CORPUS / "ruby-mail-gem/spec/fixtures/emails/plain_emails/raw_email_bad_time.eml"
    d, _ = run(p, bad_time.read_bytes())
    assert "spam" in d.tags  # X-Spam-Status: Yes
    bounce = CORPUS / "flufl-bounce/data/bounce_03.txt"  # From: MAILER-DAEMON@...
    d, t = run(p, bounce.read_bytes())
    assert d.ignore and t.matched[0] == "bounce"


def test_shipped_default_and_examples_are_valid(tmp_path):
    settings_ex = settings(
        agents=[{"name": "alice", "queues": ["support"], "skills": ["linux"],
                 "calendar": "office"},
                {"name": "bob", "queues": ["support", "billing"], "skills": ["windows"]}])
    tpl = ROOT / "templates"
    p = load_pipeline(ROOT / "filters", settings_ex, tpl)
    assert [r.name for r in p.rules][:2] == ["spam-certain", "spam-probable"]
    ex = load_pipeline(ROOT / "filters" / "examples", settings_ex, tpl)
    assert len(ex.rules) >= 8
    d, t = run(ex, mail("Invoice #123456 overdue", sender="boss@bigcorp.example"))
    assert (d.queue, d.fields["invoice"], d.company, d.impact) == (
        "billing", "123456", "bigcorp", "high")
    d, _ = run(p, mail("Mail server down!", X_Spam_Score="0.1"))
    assert (d.type, d.urgency) == ("incident", "high")
    d, _ = run(p, mail("cheap pills", X_Spam_Score="12"))
    assert d.reject


# --- invalid files: the exact error --------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("rules:\n  - name: r\n    when: {subject: {regex: '(unclosed'}}\n",
     "filters/10-rules.yaml:3: rule 'r': when.subject.regex: bad regex '(unclosed': "
     "missing ), unterminated subpattern at position 0"),
    ("rules:\n  - name: r\n    when:\n      subjekt: x\n",
     "filters/10-rules.yaml:4: rule 'r': when.subjekt: unknown condition"),
    ("rules:\n  - name: r\n    then:\n      colour: red\n",
     "filters/10-rules.yaml:4: rule 'r': then.colour: unknown action"),
    ("rules:\n  - name: r\n    then: {queue: sales}\n",
     "filters/10-rules.yaml:3: rule 'r': then.queue: unknown queue 'sales'"),
    ("rules:\n  - name: r\n    when: {queue: [support, sales]}\n",
     "filters/10-rules.yaml:3: rule 'r': when.queue.1: unknown queue 'sales'"),
    ("rules:\n  - name: r\n    then:\n      owner: mallory\n",
     "filters/10-rules.yaml:4: rule 'r': then.owner: unknown agent 'mallory'"),
    ("rules:\n  - name: r\n    then:\n      auto_response: {template: nope}\n",
     "filters/10-rules.yaml:4: rule 'r': then.auto_response.template: unknown template "
     "'nope' (no templates/nope.j2)"),
    ("rules:\n  - name: r\n    when: {time: {calendar: shop, working_hours: true}}\n",
     "filters/10-rules.yaml:3: rule 'r': when.time.calendar: unknown calendar 'shop'"),
    ("rules:\n  - name: r\n    when: {subject: {regex: '(a)'}}\n    then: {tags: ['{match.2}']}\n",
     "filters/10-rules.yaml:4: rule 'r': then.tags.0: {match.2}: the rule's regexes have "
     "1 group(s)"),
    ("rules:\n  - name: r\n    then: {category: '{match.who}'}\n",
     "filters/10-rules.yaml:3: rule 'r': then.category: {match.who}: no regex of the rule "
     "has a group named 'who'"),
    ("rules:\n  - name: r\n    when: {subject: {regex: a, contains: b}}\n",
     "filters/10-rules.yaml:3: rule 'r': when.subject: give exactly one of regex, contains, "
     "equals, one_of, exists (got regex, contains)"),
    ("rules:\n  - name: r\n    then: {type: bug}\n",
     "filters/10-rules.yaml:3: rule 'r': then.type: Input should be 'incident', "
     "'service_request', 'problem' or 'change'"),
    ("rules:\n  - name: r\n    then: {priority: 9}\n",
     "filters/10-rules.yaml:3: rule 'r': then.priority: Input should be less than or equal to 5"),
    ("rules:\n  - name: r\n    stopp: true\n",
     "filters/10-rules.yaml:3: rule 'r': stopp: unknown key"),
    ("rules:\n  - when: {subject: x}\n",
     "filters/10-rules.yaml:2: rule #1: name: Field required"),
    ("rules:\n  - {name: r}\n  - {name: r}\n",
     "filters/10-rules.yaml:3: rule 'r': name: the name is already used in "
     "filters/10-rules.yaml"),
    ("rulez: []\n", "filters/10-rules.yaml:1: rulez: unknown key"),
    ("rules: {name: r}\n", "filters/10-rules.yaml:1: rules: expected a list of rules"),
    ("rules:\n  - name: r\n    when: {subject: x\n",
     "filters/10-rules.yaml:4: invalid YAML: expected ',' or '}', but got '<stream end>'"),
    ("rules:\n  - name: r\n    when: {time: {working_hours: true}}\n",
     "filters/10-rules.yaml:3: rule 'r': when.time: working_hours and holiday need a calendar"),
    ("rules:\n  - name: r\n    then: {auto_response: true}\n",
     "filters/10-rules.yaml:3: rule 'r': then.auto_response: use false to suppress, or "
     "{template: NAME} to choose one"),
])
def test_invalid_file_exact_error(tmp_path, monkeypatch, text, expected):
    monkeypatch.chdir(tmp_path)  # errors name files relative to the current directory
    assert expected in errors(tmp_path, text)


def test_every_bad_rule_is_reported_in_one_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    errs = errors(tmp_path, """
        rules:
          - {name: one, then: {queue: nowhere}}
          - {name: fine, then: {tags: [x]}}
          - {name: two, when: {subject: {regex: '['}}}
    """)
    assert len(errs) == 2
    assert errs[0].startswith("filters/10-rules.yaml:3: rule 'one': then.queue")
    assert errs[1].startswith("filters/10-rules.yaml:5: rule 'two': when.subject.regex")


def test_json_schema_describes_the_format():
    schema = json_schema({"geoip": {"type": "string"}}, {})
    assert schema["$schema"].endswith("2020-12/schema")
    cond = schema["$defs"]["Condition"]
    assert cond["additionalProperties"] is False
    assert {"all", "any", "not", "header", "sender", "spam", "time", "geoip"} <= set(
        cond["properties"])
    actions = schema["$defs"]["Actions"]["properties"]
    assert actions["type"]["anyOf"][0]["enum"] == ["incident", "service_request", "problem",
                                                   "change"]
    # the string shorthand of a match is allowed
    assert {"type": "string", "description": "contains, ignoring case"} in \
        cond["properties"]["subject"]["anyOf"][0]["anyOf"]
    json.dumps(schema)


def test_json_schema_accepts_shipped_files_and_refuses_typos():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    import yaml

    schema = json_schema()
    for f in sorted((ROOT / "filters").rglob("*.yaml")):
        jsonschema.validate(yaml.safe_load(f.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"rules": [{"name": "x", "when": {"subjekt": "y"}}]}, schema)


def test_plugin_exception_is_recorded_not_fatal(tmp_path):
    from mailgw.filters.registry import Registry

    def boom(arg):  # type: ignore[no-untyped-def]
        def check(view):  # type: ignore[no-untyped-def]
            raise RuntimeError(f"lookup {arg} failed")
        return check

    d = tmp_path / "filters"
    d.mkdir()
    (d / "a.yaml").write_text("rules:\n  - {name: p, when: {boom: 1}, then: {tags: [x]}}\n"
                              "  - {name: after, then: {tags: [y]}}\n")
    p = load_pipeline(d, settings(), None, Registry(conditions={"boom": boom}))
    dec, t = run(p, mail("x"))
    assert dec.tags == ["y"]
    assert t.errors == ["rule 'p': RuntimeError: lookup 1 failed"]


def test_view_time_defaults_to_now():
    v = MessageView(parse_message(mail("x")), queue="support")
    assert abs((v.now - datetime.now(UTC)).total_seconds()) < 5
