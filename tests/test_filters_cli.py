"""``mailgw filters check|test|schema`` as an admin runs them, and plugins found by entry point.

These commands do not open the store, so they run once (not per backend)."""

from __future__ import annotations

import json
import mailbox
import os
import textwrap
from pathlib import Path

import pytest

from tests.conftest import HomeDir
from tests.helpers import mail


@pytest.fixture
def h(tmp_path: Path) -> HomeDir:
    from mailgw.home import init_home

    init_home(tmp_path / "home")
    return HomeDir(tmp_path / "home", f"sqlite:///{tmp_path / 'unused.db'}")


RULES = """
    rules:
      - name: invoices
        when: {subject: {regex: '(?i)invoice (?P<no>\\d+)'}}
        then: {queue: billing, fields: {invoice: "{match.no}"}, type: service_request}
      - name: newsletter
        when: {subject: newsletter}
        then: {ignore: true}
        stop: true
      - name: never-after-stop
        then: {tags: [late]}
"""


def write_rules(h: HomeDir, text: str = RULES, name: str = "50-test.yaml") -> None:
    (h.path / "filters" / name).write_text(textwrap.dedent(text))


def test_check_ok_and_errors(h):
    write_rules(h)
    proc = h.cli("filters", "check", check=True)
    assert "filters OK: 7 rule(s) in 2 file(s)" in proc.stdout.decode()
    write_rules(h, "rules:\n  - name: bad\n    then: {owner: nobody}\n", "60-bad.yaml")
    proc = h.cli("filters", "check")
    assert proc.returncode == 1
    assert proc.stderr.decode().strip().endswith(
        "filters/60-bad.yaml:3: rule 'bad': then.owner: unknown agent 'nobody'")
    # `config check` checks the filters too
    proc = h.cli("config", "check")
    assert proc.returncode == 1
    assert "filters/60-bad.yaml:3: rule 'bad': then.owner: unknown agent 'nobody'" in \
        proc.stderr.decode()


def test_test_one_message_prints_every_verdict_and_the_decision(h, tmp_path):
    write_rules(h)
    eml = tmp_path / "m.eml"
    eml.write_bytes(mail("Invoice 815 unpaid"))
    out = h.cli("filters", "test", str(eml), check=True).stdout.decode()
    lines = out.splitlines()
    assert lines[0] == "message: m.eml  from alice@customer.test  subject 'Invoice 815 unpaid'"
    assert any(line.startswith("  no     spam-certain") for line in lines)
    assert any(line.startswith("  MATCH  invoices") and "queue: 'support' -> 'billing'" in line
               for line in lines)
    assert "  no     newsletter" in out and "  MATCH  never-after-stop" in out
    # a rule that did not match says which key of `when` failed
    [line] = [x for x in lines if x.startswith("  no     newsletter")]
    assert line.endswith("(failed: subject)")
    [line] = [x for x in lines if x.startswith("  no     spam-certain")]
    assert line.endswith("(failed: spam)")
    assert "  queue: billing  (by invoices)" in lines
    assert "  fields: {'invoice': '815'}  (by invoices)" in lines
    eml.write_bytes(mail("Our newsletter"))
    out = h.cli("filters", "test", str(eml), check=True).stdout.decode()
    assert "  -      never-after-stop  (not run: stopped by newsletter)" in out
    assert "  ignore: True  (by newsletter)" in out
    j = json.loads(h.cli("filters", "test", "--json", str(eml), check=True).stdout)
    assert j["decision"]["ignore"] is True and j["trace"]["stopped_by"] == "newsletter"


def test_test_follow_up_options(h, tmp_path):
    write_rules(h, """
        rules:
          - {name: reopen-billing, when: {ticket_state: [closed], ticket_queue: [billing]},
             then: {state: open}}
    """)
    eml = tmp_path / "m.eml"
    eml.write_bytes(mail("Re: x"))
    out = h.cli("filters", "test", str(eml), check=True).stdout.decode()
    assert "  no     reopen-billing" in out
    out = h.cli("filters", "test", "--ticket-state", "closed", "--ticket-queue", "billing",
                str(eml), check=True).stdout.decode()
    assert "  MATCH  reopen-billing" in out


def test_test_folder_and_mbox_print_a_summary(h, tmp_path):
    write_rules(h)
    folder = tmp_path / "past"
    folder.mkdir()
    (folder / "a.eml").write_bytes(mail("Invoice 1 is wrong"))
    (folder / "b.eml").write_bytes(mail("monthly newsletter"))
    (folder / "c.eml").write_bytes(mail("Server down", X_Spam_Score="11"))
    (folder / "d.eml").write_bytes(b"")  # not mail
    out = h.cli("filters", "test", str(folder), check=True).stdout.decode()
    rows = {line.split()[0]: line for line in out.splitlines() if line.endswith((".eml", "-"))
            or ".eml " in line}
    assert "billing" in rows["a.eml"] and "invoices" in rows["a.eml"]
    assert "ignore" in rows["b.eml"] and "newsletter" in rows["b.eml"]
    assert "reject" in rows["c.eml"] and "spam-certain" in rows["c.eml"]
    assert "error" in rows["d.eml"]
    assert "4 message(s): error 1, ignore 1, reject 1, ticket 1" in out
    assert "       1  invoices" in out and "       0  service-request-keywords" in out
    box = mailbox.mbox(tmp_path / "past.mbox")
    for raw in (mail("Invoice 2"), mail("Invoice 3"), mail("hello")):
        box.add(raw)
    box.close()
    out = h.cli("filters", "test", str(tmp_path / "past.mbox"), check=True).stdout.decode()
    assert "3 message(s): ticket 3" in out and "       2  invoices" in out
    assert "past.mbox#2" in out
    # an mbox inside a folder is read message by message too
    (folder / "d.eml").unlink()
    (tmp_path / "past.mbox").rename(folder / "archive.mbox")
    out = h.cli("filters", "test", str(folder), check=True).stdout.decode()
    assert "6 message(s): ignore 1, reject 1, ticket 4" in out and "archive.mbox#1" in out


def test_corpus_folder(h):
    from tests.corpus import CORPUS

    folder = CORPUS / "django-helpdesk" / "tests" / "test_files"
    if not folder.is_dir():
        pytest.skip(f"shared mail corpus not found at {CORPUS}")
    write_rules(h, """
        rules:
          - {name: has-attachment, when: {attachment: {min_size: 1}}, then: {tags: [att]}}
    """)
    out = h.cli("filters", "test", str(folder), check=True).stdout.decode()
    assert "6 message(s): ticket 6" in out
    assert "blank-body-with-attachment.eml" in out
    [row] = [x for x in out.splitlines() if x.startswith("blank-body-with-attachment.eml")]
    assert row.endswith("has-attachment")


PLUGIN = '''
def in_list(arg):
    """Condition: the sender is one of the listed addresses."""
    if not isinstance(arg, list):
        raise ValueError("expected a list of addresses")
    wanted = {a.lower() for a in arg}
    return lambda view: view.sender in wanted

in_list.json_schema = {"type": "array", "items": {"type": "string"}}

def escalate(arg):
    """Action: priority 1 and a tag."""
    def act(view, decision):
        decision.priority = 1
        decision.tags.append(str(arg))
    return act
'''


def test_plugin_registered_by_entry_point(h, tmp_path):
    site = tmp_path / "site"
    dist = site / "mailgw_plugin_demo-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / "mailgw_plugin_demo.py").write_text(PLUGIN)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mailgw-plugin-demo\n"
                                   "Version: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[mailgw.filter_conditions]\nin_list = mailgw_plugin_demo:in_list\n\n"
        "[mailgw.filter_actions]\nescalate = mailgw_plugin_demo:escalate\n")
    write_rules(h, """
        rules:
          - name: vip-list
            when: {in_list: [alice@customer.test]}
            then: {escalate: vip}
    """)
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "mailgw", *args], capture_output=True,
                              env={**h.env(), **env}, timeout=60)

    eml = tmp_path / "m.eml"
    eml.write_bytes(mail("hello"))
    proc = cli("filters", "test", str(eml))
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert "MATCH  vip-list" in out and "priority: 1  (by vip-list)" in out
    assert "tags: ['vip']" in out
    schema = json.loads(cli("filters", "schema").stdout)
    assert schema["$defs"]["Condition"]["properties"]["in_list"]["type"] == "array"
    assert "escalate" in schema["$defs"]["Actions"]["properties"]
    # a plugin refusing its value is a load error naming the rule and key
    write_rules(h, "rules:\n  - name: bad\n    when: {in_list: nobody}\n")
    proc = cli("filters", "check")
    assert proc.returncode == 1
    assert ("filters/50-test.yaml:3: rule 'bad': when.in_list: plugin condition refused its "
            "value: expected a list of addresses") in proc.stderr.decode()
    # without the plugin installed, the key is unknown
    proc = h.cli("filters", "check")
    assert "when.in_list: unknown condition" in proc.stderr.decode()


def test_schema_command_prints_json_schema(h):
    schema = json.loads(h.cli("filters", "schema", check=True).stdout)
    assert schema["title"] == "mailgw filter pipeline"
    assert "Rule" in schema["$defs"]


@pytest.mark.parametrize("subject, expected", [
    ("Request: VPN access for our new hire", "service_request"),
    ("Please install the printer driver", "service_request"),
    ("Review my pull request #42", None),
    ("Merge Request !17 needs approval", None),
    ("Feature request: dark mode", "service_request"),
])
def test_default_rules_service_request(h, tmp_path, subject, expected):
    """The shipped 00-default.yaml: "pull request" / "merge request" are not service requests."""
    msg = tmp_path / "m.eml"
    msg.write_bytes(mail(subject))
    proc = h.cli("filters", "test", str(msg), "--json", check=True)
    decision = json.loads(proc.stdout)["decision"]
    assert decision.get("type") == expected
