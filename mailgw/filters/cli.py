"""``mailgw filters check|test|schema`` and ``mailgw explain TICKET``.

``filters test`` is a dry run: it parses the given mail, runs the pipeline and prints each
rule's verdict and the decision; nothing is stored and the store is not opened.
"""

from __future__ import annotations

import json
import mailbox
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from mailgw.filters.engine import Decision, MessageView, Pipeline, Trace
from mailgw.settings import ConfigError, Settings

EX_CONFIG = 78


def _load(obj: Any) -> tuple[Settings, Pipeline]:
    from mailgw.filters.loader import load_pipeline

    settings = obj.settings()
    try:
        return settings, load_pipeline(obj.home.filters_dir(settings), settings,
                                       obj.home.templates)
    except ConfigError as exc:
        for e in exc.errors:
            click.echo(e, err=True)
        sys.exit(1)


@click.group("filters")
def filters() -> None:
    """Check, dry-run and describe the filter pipeline in filters/."""


@filters.command("check")
@click.pass_obj
def filters_check(obj: Any) -> None:
    """Validate filters/*.yaml; each error names the file, line, rule and field."""
    from mailgw.filters.loader import BUILTIN_KEYS, check_plugins
    from mailgw.filters.registry import load_registry

    settings, pipeline = _load(obj)
    for line in check_plugins(load_registry(BUILTIN_KEYS)):
        click.echo(f"warning: {line}", err=True)
    files = [f for f in pipeline.files if f != str(obj.home.filters_dir(settings))]
    click.echo(f"filters OK: {len(pipeline.rules)} rule(s) in {len(files)} file(s) "
               f"({obj.home.filters_dir(settings)})")


@filters.command("schema")
def filters_schema() -> None:
    """Print the JSON Schema of a filter file (for editor completion and checking)."""
    from mailgw.filters.loader import BUILTIN_KEYS
    from mailgw.filters.model import json_schema
    from mailgw.filters.registry import load_registry

    reg = load_registry(BUILTIN_KEYS)
    click.echo(json.dumps(json_schema(reg.schemas("conditions"), reg.schemas("actions")),
                          indent=2))


def _mbox(path: Path, label: str) -> list[tuple[str, bytes]]:
    box = mailbox.mbox(path, create=False)
    try:
        return [(f"{label}#{i}", box.get_bytes(k)) for i, k in enumerate(box.iterkeys())]
    finally:
        box.close()


def _messages(path: Path) -> tuple[str, list[tuple[str, bytes]]]:
    """("one" | "many", [(name, raw)]) for a file, an mbox, or a folder of either
    (recursively); an mbox is recognised by its leading "From " line."""
    if path.is_dir():
        out: list[tuple[str, bytes]] = []
        for p in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            raw = p.read_bytes()
            name = str(p.relative_to(path))
            out += _mbox(p, name) if raw.startswith(b"From ") else [(name, raw)]
        return "many", out
    raw = path.read_bytes()
    if raw.startswith(b"From "):
        return "many", _mbox(path, path.name)
    return "one", [(path.name, raw)]


def _queue_for(settings: Settings, mail: Any, forced: str | None) -> str:
    if forced:
        if settings.queue(forced) is None:
            raise click.BadParameter(f"no queue named {forced!r}", param_hint="--queue")
        return forced
    for addr in [*mail.to, *mail.cc]:
        q = settings.queue_for_recipient(addr)
        if q is not None:
            return q.name
    return settings.default_queue or settings.queues[0].name


def _changes(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{f}: {old!r} -> {new!r}" for f, old, new in changes)


def _decision_summary(d: Decision) -> dict[str, Any]:
    return {k: v for k, v in d.as_dict().items() if v not in (None, False, [], {})}


@filters.command("test")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--queue", help="The queue the mail arrives in (default: by To/Cc, else the "
              "default queue, else the first queue).")
@click.option("--ticket-state", type=click.Choice(["new", "open", "pending", "closed"]),
              help="Run as a follow-up to a ticket in this state.")
@click.option("--ticket-queue", help="With --ticket-state: the ticket's queue.")
@click.option("--at", "at", help="Evaluate time conditions at this ISO time (default now).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def filters_test(obj: Any, path: Path, queue: str | None, ticket_state: str | None,
                 ticket_queue: str | None, at: str | None, as_json: bool) -> None:
    """Dry-run MESSAGE.eml, a FOLDER of messages or an MBOX through the pipeline.

    One message: each rule's verdict and the resulting decision. Several: a summary table,
    one line per message, and how often each rule matched. Nothing is stored.
    """
    from mailgw.mail.parse import parse_message

    settings, pipeline = _load(obj)
    when = datetime.fromisoformat(at) if at else datetime.now(UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    kind, messages = _messages(path)
    results: list[dict[str, Any]] = []
    detail: tuple[Decision, Trace] | None = None
    last_view: MessageView | None = None
    for name, raw in messages:
        try:
            mail = parse_message(raw)
        except Exception as exc:  # noqa: BLE001 - reported per message, the run goes on
            results.append({"message": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        q = _queue_for(settings, mail, queue)
        view = MessageView(mail, queue=q, ticket_state=ticket_state,
                           ticket_queue=(ticket_queue or q) if ticket_state else None, now=when)
        decision, trace = pipeline.run(view)
        detail, last_view = (decision, trace), view
        results.append({"message": name, "subject": mail.subject, "from": view.sender,
                        "decision": _decision_summary(decision), "trace": trace.as_json()})
    if kind == "one" and detail is not None and not as_json:
        decision, trace = detail
        click.echo(f"message: {messages[0][0]}  from {results[0]['from']}  "
                   f"subject {results[0]['subject']!r}")
        for rule, ok, changes in trace.results:
            verdict = "MATCH" if ok else "no"
            tail = f"  {_changes(changes)}" if changes else ""
            if not ok:
                failed = rule.failed_on(last_view) if last_view is not None else None
                tail = f"  (failed: {failed})" if failed else ""
            stop = "  (stop)" if ok and rule.stop else ""
            click.echo(f"  {verdict:<6} {rule.name}  [{rule.file}]{tail}{stop}")
        for name in trace.not_evaluated:
            click.echo(f"  {'-':<6} {name}  (not run: stopped by {trace.stopped_by})")
        for err in trace.errors:
            click.echo(f"  ERROR  {err}")
        click.echo("decision:")
        for k, v in _decision_summary(decision).items():
            if k == "set_by":
                continue
            by = decision.set_by.get(k)
            click.echo(f"  {k}: {v}" + (f"  (by {by})" if by else ""))
        return
    if as_json:
        click.echo(json.dumps(results if kind == "many" else results[0], indent=2,
                              default=str))
        return
    if kind == "one":  # the message could not be parsed
        click.echo(f"{results[0]['message']}: {results[0]['error']}", err=True)
        sys.exit(1)
    _summary(results, pipeline, settings.priority.default)


def _summary(results: list[dict[str, Any]], pipeline: Pipeline, default_priority: int) -> None:
    click.echo(f"{'MESSAGE':<40} {'QUEUE':<12} {'PRI':>3} {'TYPE':<16} {'OUTCOME':<8} RULES")
    hits: dict[str, int] = {r.name: 0 for r in pipeline.rules}
    outcomes: dict[str, int] = {}
    for r in results:
        if "error" in r:
            click.echo(f"{r['message'][:40]:<40} {'-':<12} {'-':>3} {'-':<16} {'error':<8} "
                       f"{r['error'][:60]}")
            outcomes["error"] = outcomes.get("error", 0) + 1
            continue
        d, matched = r["decision"], [x["rule"] for x in r["trace"]["matched"]]
        for name in matched:
            hits[name] = hits.get(name, 0) + 1
        outcome = "reject" if d.get("reject") else "ignore" if d.get("ignore") else "ticket"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        click.echo(f"{r['message'][:40]:<40} {d.get('queue', '')[:12]:<12} "
                   f"{d.get('priority', default_priority):>3} {str(d.get('type', '-'))[:16]:<16} "
                   f"{outcome:<8} {', '.join(matched) or '-'}")
    click.echo(f"\n{len(results)} message(s): "
               + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    click.echo("rule hits:")
    for name, n in hits.items():
        click.echo(f"  {n:>6}  {name}")


def _explain_inbound(obj: Any, inbound_id: int, as_json: bool) -> None:
    """A message that made no ticket (ignored or rejected by a rule): its trace."""
    from sqlalchemy import select

    from mailgw.store.db import read_session
    from mailgw.store.models import Event, Inbound, Ticket

    with read_session(obj.engine()) as s:
        row = s.get(Inbound, inbound_id)
        if row is None:
            click.echo(f"no inbound message {inbound_id}", err=True)
            sys.exit(1)
        number = (s.scalar(select(Ticket.number).where(Ticket.id == row.ticket_id))
                  if row.ticket_id else None)
        events = [{"type": e.type, **e.data} for e in s.scalars(
            select(Event).where(Event.inbound_id == inbound_id).order_by(Event.id))]
        data = {"inbound": inbound_id, "state": row.state, "mail_from": row.mail_from,
                "rcpt_tos": row.rcpt_tos, "error": row.error, "ticket": number,
                "events": events}
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    click.echo(f"inbound {inbound_id}: {row.state}, from <{row.mail_from}> to "
               f"{', '.join(row.rcpt_tos)}" + (f", ticket {number}" if number else ""))
    if row.error:
        click.echo(f"   error: {row.error}")
    for ev in events:
        trace = ev.get("trace")
        if ev["type"] in ("filter_ignored", "filter_rejected") and trace:
            click.echo(f"   {ev['type'].removeprefix('filter_')} by rule {ev.get('rule')!r}: "
                       "stored, no ticket, no reply")
            for hit in trace["matched"]:
                ch = ", ".join(f"{f}: {old!r} -> {new!r}" for f, (old, new)
                               in hit["changes"].items()) or "no change"
                click.echo(f"   rule MATCH {hit['rule']} [{hit['file']}]: {ch}")
            if trace["not_matched"]:
                click.echo(f"   rules not matched: {', '.join(trace['not_matched'])}")
        else:
            click.echo(f"   event {ev['type']}")
    if number:
        click.echo(f"   (mailgw explain {number} shows the ticket)")


@click.command("explain")
@click.argument("number", required=False)
@click.option("--inbound", "inbound_id", type=int,
              help="Explain this inbound message instead (e.g. one a rule ignored or "
                   "rejected, which made no ticket).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def explain(obj: Any, number: str | None, inbound_id: int | None, as_json: bool) -> None:
    """Why TICKET looks as it does: per incoming message, how it was threaded, which filter
    rules matched (and which did not), what each changed, who was assigned and why, and
    which auto-responses were sent or suppressed; the SLA clocks and why each is due when
    it is."""
    from sqlalchemy import select

    from mailgw.sla.explain import explain_ticket
    from mailgw.sla.explain import render_text as render_sla
    from mailgw.store.db import read_session
    from mailgw.store.models import Article, Event, Ticket

    if inbound_id is not None:
        _explain_inbound(obj, inbound_id, as_json)
        return
    if number is None:
        raise click.UsageError("give a TICKET number, or --inbound ID")

    hook = obj.settings().ticket_numbers.hook
    number = number.strip().strip("[]").strip().removeprefix(hook).strip("#: ")
    with read_session(obj.engine()) as s:
        t = s.scalars(select(Ticket).where(Ticket.number == number)).first()
        if t is None:
            click.echo(f"no ticket {number}", err=True)
            sys.exit(1)
        events = list(s.scalars(select(Event).where(Event.ticket_id == t.id)
                                .order_by(Event.id)))
        by_inbound: dict[int | None, list[Event]] = {}
        for ev in events:
            by_inbound.setdefault(ev.inbound_id, []).append(ev)
        messages = []
        for a in s.scalars(select(Article).where(Article.ticket_id == t.id,
                                                 Article.direction == "in")
                           .order_by(Article.id)):
            evs = by_inbound.get(a.inbound_id, [])
            messages.append({
                "article": a.id, "from": a.from_addr, "subject": a.subject,
                "received_at": a.created_at.isoformat() if a.created_at else None,
                "threaded_by": a.threaded_by, "thread_reason": a.thread_reason,
                "automatic": a.automatic_reason,
                "filters": a.filter_trace,
                "assignment": next((e.data for e in evs if e.type == "assigned"), None),
                "auto_response": [{"event": e.type, **e.data} for e in evs
                                  if e.type.startswith("auto_response")],
                "events": [{"type": e.type, **e.data} for e in evs
                           if e.type not in ("assigned",) and
                           not e.type.startswith("auto_response")],
            })
        data = {
            "number": t.number, "title": t.title, "queue": t.queue, "state": t.state,
            "priority": t.priority, "urgency": t.urgency, "impact": t.impact, "type": t.type,
            "service": t.service, "category": t.category, "tags": t.tags or [],
            "custom_fields": t.custom_fields or {}, "customer": t.customer,
            "company": t.company, "owner": t.owner, "messages": messages,
        }
        # SLA clocks and their ledger in words (mailgw/sla/explain.py)
        data["sla"] = explain_ticket(s, obj.settings(), t)
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    click.echo(f"{hook}{data['number']}  {data['title']}")
    fields = ("queue", "state", "priority", "urgency", "impact", "type", "service", "category",
              "customer", "company", "owner")
    click.echo("  " + " · ".join(f"{k} {data[k]}" for k in fields if data[k] is not None))
    if data["tags"]:
        click.echo(f"  tags: {', '.join(data['tags'])}")
    if data["custom_fields"]:
        click.echo(f"  fields: {json.dumps(data['custom_fields'])}")
    for msg in messages:
        click.echo(f"\n<- article {msg['article']} from {msg['from']} at {msg['received_at']}"
                   f": {msg['subject']!r}")
        click.echo(f"   threading: {msg['threaded_by']} ({msg['thread_reason']})")
        tr = msg["filters"]
        if tr is None:
            click.echo("   filters: none ran")
        else:
            for hit in tr["matched"]:
                ch = ", ".join(f"{f}: {old!r} -> {new!r}" for f, (old, new)
                               in hit["changes"].items()) or "no change"
                click.echo(f"   rule MATCH {hit['rule']} [{hit['file']}]: {ch}"
                           + ("  (stop)" if hit["stop"] else ""))
            if tr["not_matched"]:
                click.echo(f"   rules not matched: {', '.join(tr['not_matched'])}")
            if tr["not_evaluated"]:
                click.echo(f"   not run (stopped by {tr['stopped_by']}): "
                           f"{', '.join(tr['not_evaluated'])}")
            for err in tr.get("errors", []):
                click.echo(f"   rule ERROR {err}")
        if msg["assignment"]:
            asg = msg["assignment"]
            click.echo(f"   assignment: {asg.get('owner') or 'none (stays in the queue)'} "
                       f"via {asg.get('strategy')}: {asg.get('reason')}")
            for name, why in (asg.get("unavailable") or {}).items():
                click.echo(f"      {name} unavailable: {why}")
        for ar in msg["auto_response"]:
            if ar["event"] == "auto_response_queued":
                click.echo(f"   auto-response: {ar.get('template')} to {ar.get('to')}")
            else:
                click.echo(f"   auto-response suppressed: {ar.get('reason')}")
    click.echo("")
    for line in render_sla(data["sla"]):
        click.echo(line)
