"""The ``mailgw`` command. Exit codes for ``deliver`` follow sysexits.h, as MTAs expect."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import click

from mailgw.settings import ConfigError, Home, Settings, load_settings

EX_OK, EX_USAGE, EX_DATAERR, EX_TEMPFAIL, EX_CONFIG = 0, 64, 65, 75, 78


class Obj:
    def __init__(self, home: Home):
        self.home = home
        self._settings: Settings | None = None

    def settings(self, *, raise_errors: bool = False) -> Settings:
        if self._settings is None:
            try:
                self._settings = load_settings(self.home)
            except ConfigError as exc:
                if raise_errors:
                    raise
                for line in exc.errors:
                    click.echo(f"config error: {line}", err=True)
                sys.exit(EX_CONFIG)
            url = os.environ.get("MAILGW_STORE_URL")
            if url:
                self._settings = self._settings.model_copy(update={"store_url": url})
        return self._settings

    def reload_settings(self) -> Settings:
        """Read config/mailgw.yaml again (``mailgw run`` on SIGHUP); raises ConfigError."""
        settings = load_settings(self.home)
        url = os.environ.get("MAILGW_STORE_URL")
        if url:
            settings = settings.model_copy(update={"store_url": url})
        return settings

    def engine(self, *, migrate: bool = True):  # type: ignore[no-untyped-def]
        from mailgw.store.db import make_engine
        from mailgw.store.db import migrate as do_migrate

        engine = make_engine(self.home.store_url(self.settings()))
        if migrate:
            do_migrate(engine)
        return engine


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", envvar="MAILGW_HOME", type=click.Path(file_okay=False),
              help="Directory holding config/ filters/ templates/ store/ (default: current "
                   "directory; env MAILGW_HOME).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="mailgw")
@click.pass_context
def main(ctx: click.Context, home: str | None, verbose: int) -> None:
    """mailgw: an email help desk gateway. Mail in, tickets out, nothing lost."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = Obj(Home.resolve(home))


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--exist-ok", is_flag=True, help="Add missing files to an existing home.")
def init(directory: str, exist_ok: bool) -> None:
    """Write the shipped default config, filters and templates into a new home DIRECTORY."""
    from mailgw.home import init_home

    try:
        written = init_home(Path(directory), exist_ok=exist_ok)
    except FileExistsError as exc:
        raise click.ClickException(f"{exc}; use --exist-ok to add only missing files") from None
    for p in written:
        click.echo(f"wrote {p}")
    click.echo(f"mailgw home ready in {Path(directory).resolve()}")


class _WorkersType(click.ParamType):
    """``--workers``: 0 to 64, or ``auto``."""

    name = "N|auto"

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        from mailgw.settings import check_processes

        try:  # the config's worker.processes rule; on the command line a number is text
            return check_processes(int(value) if str(value).isdigit() else value)
        except ValueError as exc:
            self.fail(f"{value!r}: {exc}", param, ctx)


@main.command()
@click.option("--smtp", "smtp", metavar="HOST:PORT", help="SMTP listen address (overrides "
              "smtp.listen in config/mailgw.yaml; default 127.0.0.1:2525).")
@click.option("--role", "roles", multiple=True,
              type=click.Choice(["smtp", "worker", "sender", "scheduler", "imap"]),
              help="Run only these roles (repeatable); default all of them.")
@click.option("--workers", type=_WorkersType(), default=None,
              help="Worker processes to start: 0 runs the worker as a thread of this process; "
                   "auto (worker.processes' default): 1 on SQLite, a core each beside the "
                   "gateway's on PostgreSQL (at most 8), a thread on one core.")
@click.option("--supervised", is_flag=True, hidden=True,
              help="Internal: a worker process started by --workers (woken through stdin).")
@click.pass_obj
def run(obj: Obj, smtp: str | None, roles: tuple[str, ...], workers: int | str | None,
        supervised: bool) -> None:
    """Run the gateway (SMTP/LMTP listeners, worker, sender, scheduler) until SIGINT/SIGTERM."""
    from mailgw.gateway import ROLES, Gateway, ListenError

    if not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger("mailgw").setLevel(logging.INFO)
    settings = obj.settings()
    if smtp:
        from mailgw.settings import _host_port

        try:
            _host_port(smtp)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--smtp") from None
    if supervised:
        workers = 0  # a worker process started by a gateway: it is the worker
    else:
        from sqlalchemy.engine import make_url

        from mailgw.settings import worker_processes

        sqlite = make_url(obj.home.store_url(settings)).get_backend_name() == "sqlite"
        workers = worker_processes(settings.worker.processes if workers is None else workers,
                                   sqlite=sqlite)
    try:
        code = Gateway(obj.home, settings, roles or ROLES, smtp, workers=workers,
                       supervised=supervised, loader=obj.reload_settings).run()
    except ListenError as exc:
        click.echo(f"mailgw run: {exc}", err=True)
        sys.exit(EX_CONFIG)
    except ConfigError as exc:  # the filters in filters/ are invalid: refuse to start
        for line in exc.errors:
            click.echo(f"filters error: {line}", err=True)
        sys.exit(EX_CONFIG)
    sys.exit(code)


@main.command()
@click.option("--queue", help="Put the message into this queue, whatever its recipients.")
@click.option("--sender", "mail_from", default=None,
              help="Envelope sender (Postfix: ${sender}; empty for the null sender <>). "
                   "Unknown when not given.")
@click.option("--recipient", "recipients", multiple=True,
              help="Envelope recipient (Postfix: ${recipient}); repeatable.")
@click.pass_obj
def deliver(obj: Obj, queue: str | None, mail_from: str | None, recipients: tuple[str, ...]) -> None:
    """Read one message on stdin and queue it durably (for an MTA pipe transport).

    Exit 0 once the message is durable, 65 (EX_DATAERR) if the input is not mail at all,
    75 (EX_TEMPFAIL) on an internal failure, so the MTA keeps the message and retries.
    """
    try:
        from mailgw.intake.pipe import read_message

        # A large message comes as a RawBuffer, which the store empties once it holds the
        # bytes (mailgw/intake/pipe.py: what keeps a 25 MB message under 3x in RSS).
        raw = read_message(sys.stdin.buffer)
    except Exception as exc:  # noqa: BLE001 - anything here is a temporary failure for the MTA
        click.echo(f"mailgw deliver: cannot read stdin: {exc}", err=True)
        sys.exit(EX_TEMPFAIL)
    from mailgw.mail.parse import looks_like_mail

    if not looks_like_mail(raw):
        click.echo("mailgw deliver: input is not an email message", err=True)
        sys.exit(EX_DATAERR)
    try:
        settings = obj.settings(raise_errors=True)
    except ConfigError as exc:
        click.echo("mailgw deliver: " + "; ".join(exc.errors), err=True)
        sys.exit(EX_TEMPFAIL)
    if queue and settings.queue(queue) is None:
        click.echo(f"mailgw deliver: no queue named {queue!r} in the config", err=True)
        sys.exit(EX_TEMPFAIL)
    if not queue and not any(settings.queue_for_recipient(r) for r in recipients):
        # A pipe transport without a served recipient: the default queue, else the first.
        queue = settings.default_queue or settings.queues[0].name
    try:
        from mailgw.intake.pipe import put_lean
        from mailgw.store.db import SCHEMA_REVISION
        from mailgw.types import Envelope

        env = Envelope(
            raw=raw, mail_from=None if mail_from is None else mail_from.strip("<>"), rcpt_tos=tuple(recipients),
            source="pipe", received_at=datetime.now(UTC), queue=queue,
        )
        # One process per message: the driver alone when it can (mailgw/intake/pipe.py).
        inbound_id = put_lean(obj.home.store_url(settings), env, SCHEMA_REVISION)
        if inbound_id is None:
            from mailgw.queue import put

            inbound_id = put(obj.engine(), env)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - the MTA must retry, not bounce
        logging.getLogger("mailgw").exception("deliver failed")
        click.echo(f"mailgw deliver: temporary failure: {exc}", err=True)
        sys.exit(EX_TEMPFAIL)
    click.echo(f"queued as {inbound_id}", err=True)
    sys.exit(EX_OK)


@main.group()
def tickets() -> None:
    """List and show tickets."""


def _number(obj: Obj, text: str) -> str:
    """A ticket number as typed: 2026…, Ticket#2026… or [Ticket#2026…]."""
    hook = obj.settings().ticket_numbers.hook
    return text.strip().strip("[]").strip().removeprefix(hook).strip("#: ")


def _iso(dt: datetime | None) -> str | None:
    # Everything is stored in UTC; SQLite hands datetimes back without their zone.
    if dt is None:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).isoformat()


@tickets.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--state", help="Only tickets in this state (new, open, pending, closed).")
@click.option("--queue", help="Only tickets in this queue.")
@click.option("--limit", default=100, show_default=True, help="At most this many, newest first.")
@click.pass_obj
def tickets_list(obj: Obj, as_json: bool, state: str | None, queue: str | None,
                 limit: int) -> None:
    """List tickets, newest first."""
    from sqlalchemy import func, select

    from mailgw.store.db import read_session
    from mailgw.store.models import Article, Ticket

    with read_session(obj.engine()) as s:
        n_articles = (select(func.count()).where(Article.ticket_id == Ticket.id)
                      .correlate(Ticket).scalar_subquery())
        q = select(Ticket, n_articles).order_by(Ticket.id.desc()).limit(limit)
        if state:
            q = q.where(Ticket.state == state)
        if queue:
            q = q.where(Ticket.queue == queue)
        rows = [{
            "number": t.number, "title": t.title, "queue": t.queue, "state": t.state,
            "priority": t.priority, "customer": t.customer, "owner": t.owner,
            "articles": n or 0, "created_at": _iso(t.created_at), "updated_at": _iso(t.updated_at),
        } for t, n in s.execute(q)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no tickets")
        return
    click.echo(f"{'NUMBER':<22} {'STATE':<8} {'QUEUE':<12} {'ART':>3}  {'CUSTOMER':<28} TITLE")
    for r in rows:
        click.echo(f"{r['number']:<22} {r['state']:<8} {r['queue'][:12]:<12} {r['articles']:>3}  "
                   f"{r['customer'][:28]:<28} {r['title'][:60]}")


@tickets.command("show")
@click.argument("number")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON (each article's sanitised HTML body under \"html\").")
@click.option("--html", "show_html", is_flag=True,
              help="Also print each article's sanitised HTML body.")
@click.pass_obj
def tickets_show(obj: Obj, number: str, as_json: bool, show_html: bool) -> None:
    """Show one ticket with its articles and how each was threaded."""
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    from mailgw.mail.sanitize import cache_article_html, sanitised_from_raw
    from mailgw.store.db import read_session, session_factory
    from mailgw.store.models import Article, Attachment, Ticket

    settings = obj.settings()
    number = _number(obj, number)
    with read_session(obj.engine()) as s:
        t = s.scalars(select(Ticket).where(Ticket.number == number)).first()
        if t is None:
            click.echo(f"no ticket {number}", err=True)
            sys.exit(1)
        articles = []
        unsanitised = []  # articles whose HTML is still only in their raw mail (decision 32)
        for a in s.scalars(select(Article).where(Article.ticket_id == t.id).order_by(Article.id)):
            atts = s.execute(select(Attachment.filename, Attachment.content_type, Attachment.size)
                             .where(Attachment.article_id == a.id)).all()
            articles.append({
                "id": a.id, "direction": a.direction, "sender_type": a.sender_type,
                "from": a.from_addr, "from_name": a.from_name, "to": a.to_addrs,
                "subject": a.subject, "message_id": a.message_id, "text": a.body_text,
                "threaded_by": a.threaded_by, "thread_reason": a.thread_reason,
                "automatic": a.automatic_reason, "delivery_state": a.delivery_state,
                "created_at": _iso(a.created_at),
                "mail_class": a.mail_class, "visible_text": a.visible_text,
                "signature": a.signature_text, "quoted_text": a.quoted_text,
                "delivery_error": a.delivery_error,
                "attachments": [{"filename": f, "content_type": c, "size": n} for f, c, n in atts],
                "internal": a.internal, "agent": a.agent,  # agent mail (docs/agent-mail.md)
                # Appended (decision 32): the sanitised HTML body, or None.
                "html": a.body_html or None,
            })
            if a.body_html is None and a.has_html and (as_json or show_html):
                # First shown: sanitised from the raw mail here, in the read transaction.
                html = sanitised_from_raw(s, a)
                if html is not None:
                    articles[-1]["html"] = html or None
                    unsanitised.append((a.id, html))
        data = {
            "number": t.number, "title": t.title, "queue": t.queue, "state": t.state,
            "priority": t.priority, "customer": t.customer, "owner": t.owner,
            "created_at": _iso(t.created_at), "updated_at": _iso(t.updated_at),
            "articles": articles,
            # Appended keys (issues 6, 7): the SLA in force, #pending's reminder, #merge's target.
            "sla": t.sla, "pending_until": _iso(t.pending_until),
            "merged_into": (s.scalar(select(Ticket.number).where(Ticket.id == t.merged_into))
                            if t.merged_into else None),
            # What happens at pending_until: "reopen" (reminder) or "close" (#pending … close).
            "pending_action": (t.pending_action or "reopen") if t.pending_until else None,
        }
    # ... and cached in body_html, an article a short write transaction (SQLite's one write
    # lock is not held while mail is parsed). Best effort: a store this command may only
    # read (a read-only role), or one busy past its timeout, shows the HTML all the same.
    for article_id, html in unsanitised:
        try:
            with session_factory(obj.engine()).begin() as w:
                cache_article_html(w, article_id, html)
        except SQLAlchemyError as exc:
            click.echo(f"note: sanitised HTML not cached (article {article_id}): "
                       f"{str(exc).splitlines()[0]}", err=True)
            break
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    hook = settings.ticket_numbers.hook
    click.echo(f"{hook}{t.number}  {t.title}")
    click.echo(f"queue {t.queue} · state {t.state} · priority {t.priority} · customer {t.customer}"
               + (f" · owner {t.owner}" if t.owner else "") + (f" · SLA {t.sla}" if t.sla else ""))
    if data["pending_until"]:
        then = "then closed" if data["pending_action"] == "close" else "then reopened"
        click.echo(f"pending until {data['pending_until']}, {then}")
    if data["merged_into"]:
        click.echo(f"merged into {hook}{data['merged_into']}")
    for a in articles:
        arrow = "<-" if a["direction"] == "in" else "->"
        click.echo(f"\n{arrow} article {a['id']} {a['direction']} from {a['from']} "
                   f"at {a['created_at']}")
        click.echo(f"   subject: {a['subject']}")
        click.echo(f"   threaded: {a['threaded_by']} ({a['thread_reason']})")
        if a["agent"] or a["internal"]:
            click.echo(f"   agent: {a['agent'] or '-'}" + (" · internal, not sent to the customer"
                                                         if a["internal"] else ""))
        if a["automatic"]:
            click.echo(f"   automatic: {a['automatic']}")
        if a["delivery_state"]:
            click.echo(f"   delivery: {a['delivery_state']}"
                       + (f" ({a['delivery_error']})" if a["delivery_error"] else ""))
        for att in a["attachments"]:
            click.echo(f"   attachment: {att['filename']} ({att['content_type']}, {att['size']} B)")
        click.echo("   " + "\n   ".join((a["text"] or "").strip().splitlines()[:40]))
        if show_html:
            html = (a["html"] or "").strip()
            click.echo("   html:" + ("\n   | ".join(["", *html.splitlines()]) if html else " none"))


@tickets.command("state")
@click.argument("number")
@click.argument("state", type=click.Choice(["new", "open", "pending", "closed"]))
@click.pass_obj
def tickets_state(obj: Obj, number: str, state: str) -> None:
    """Set a ticket's STATE (new, open, pending, closed); recorded in the event log."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from mailgw.queue import now
    from mailgw.store.models import Event, Ticket

    number = _number(obj, number)
    with Session(obj.engine()) as s, s.begin():
        t = s.scalars(select(Ticket).where(Ticket.number == number)).first()
        if t is None:
            click.echo(f"no ticket {number}", err=True)
            sys.exit(1)
        old, stamp = t.state, now()
        t.state, t.updated_at = state, stamp
        t.closed_at = stamp if state == "closed" else None
        # Only #pending sets a pending time; any other state change ends the old one.
        t.pending_until = t.pending_action = None
        s.add(Event(type="state_changed", ticket_id=t.id, created_at=stamp,
                    data={"old": old, "new": state, "reason": "mailgw tickets state"}))
        if old != state:  # the SLA clocks pause, resume or stop with the state
            from mailgw import ticket_events

            ticket_events.ticket_changed(s, obj.settings(), t, {"state": (old, state)},
                                         at=stamp, reason="mailgw tickets state")
    click.echo(f"{number}: {old} -> {state}")


@main.group()
def config() -> None:
    """Inspect the configuration."""


@config.command("check")
@click.pass_obj
def config_check(obj: Obj) -> None:
    """Validate config/, filters/ and templates/; print each error with its file, line and path."""
    from mailgw.outbound.render import Renderer

    errors: list[str] = []
    try:
        settings = load_settings(obj.home)
    except ConfigError as exc:
        errors += exc.errors
    else:  # the filters refer to queues and agents, so they are checked with a valid config
        from mailgw.filters.loader import load_pipeline

        try:
            load_pipeline(obj.home.filters_dir(settings), settings, obj.home.templates)
        except ConfigError as exc:
            errors += exc.errors
        from mailgw.sla.notices import check_templates  # the SLA levels' notice templates

        errors += check_templates(settings, Renderer(obj.home.templates))
    errors += Renderer(obj.home.templates).check()
    if not errors and settings.agent_mail.enabled:
        from mailgw.outbound.render import AGENT_MAIL

        errors += Renderer(obj.home.templates).check(AGENT_MAIL)
    if errors:
        for e in errors:
            click.echo(e, err=True)
        sys.exit(1)
    click.echo(f"config OK: {obj.home.config_file}")


@main.group()
def quarantine() -> None:
    """Messages that could not be processed, kept raw and replayable."""


@quarantine.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def quarantine_list(obj: Obj, as_json: bool) -> None:
    """List quarantined messages with the reason."""
    from sqlalchemy import select

    from mailgw.store.db import read_session
    from mailgw.store.models import Inbound

    with read_session(obj.engine()) as s:
        rows = [{
            "id": i, "received_at": _iso(r), "source": src, "mail_from": f, "rcpt_tos": to,
            "size": n, "attempts": a, "error": e,
        } for i, r, src, f, to, n, a, e in s.execute(
            select(Inbound.id, Inbound.received_at, Inbound.source, Inbound.mail_from,
                   Inbound.rcpt_tos, Inbound.size, Inbound.attempts, Inbound.error)
            .where(Inbound.state == "quarantined").order_by(Inbound.id))]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("quarantine is empty")
    for r in rows:
        click.echo(f"{r['id']:>8}  {r['received_at']}  {r['source']:<5} from <{r['mail_from']}>"
                   f"  {r['size']} B\n          {r['error']}")


@quarantine.command("replay")
@click.argument("ids", nargs=-1, type=int, required=True)
@click.pass_obj
def quarantine_replay(obj: Obj, ids: tuple[int, ...]) -> None:
    """Put quarantined message(s) back into the queue; the worker processes them again."""
    from mailgw.queue import replay

    engine = obj.engine()
    failed = False
    for i in ids:
        if replay(engine, i):
            click.echo(f"{i}: queued again")
        else:
            click.echo(f"{i}: not in quarantine", err=True)
            failed = True
    sys.exit(1 if failed else 0)


# Filter pipelines and decision records (issue 4): mailgw/filters/cli.py.
from mailgw.filters.cli import explain, filters  # noqa: E402

main.add_command(filters)
main.add_command(explain)
@main.group()
def mailboxes() -> None:
    """IMAP mailboxes mailgw reads (config/mailgw.yaml: mailboxes)."""


@mailboxes.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def mailboxes_check(obj: Obj, as_json: bool) -> None:
    """Log in to every configured mailbox; report its folders, message counts and capabilities,
    or the exact error. Exits 1 if any mailbox or folder fails."""
    from mailgw.intake.imap import check
    from mailgw.intake.imap_auth import AuthError, _answer

    settings = obj.settings()
    results, failed = [], False
    for mb in settings.mailboxes:
        r: dict = {"mailbox": mb.name, "host": mb.host, "port": mb.real_port, "tls": mb.tls,
                   "username": mb.username, "ok": False}
        try:
            caps, folders = check(mb, obj.home.path)
            r["capabilities"] = caps
            r["folders"] = [{"folder": f.folder, "messages": f.messages, "error": f.error}
                            for f in folders]
            r["ok"] = all(f.error is None for f in folders)
            if not r["ok"]:
                r["error"] = "; ".join(f"folder {f.folder}: {f.error}" for f in folders if f.error)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, per mailbox
            msg = str(exc) if isinstance(exc, AuthError) else (
                f"mailbox {mb.name}: cannot connect to {mb.host}:{mb.real_port} ({mb.tls}): "
                f"{type(exc).__name__}: {_answer(exc)}")
            r["error"] = msg
        failed |= not r["ok"]
        results.append(r)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        if not results:
            click.echo("no mailboxes configured")
        for r in results:
            if "folders" in r:
                click.echo(f"{r['mailbox']}: logged in to {r['host']}:{r['port']} ({r['tls']}) "
                           f"as {r['username']}")
                for f in r["folders"]:
                    click.echo(f"  folder {f['folder']}: " + (
                        f"{f['messages']} messages" if f["error"] is None
                        else f"ERROR {f['error']}"))
                click.echo(f"  capabilities: {' '.join(r['capabilities'])}")
            if not r["ok"]:
                click.echo(f"{r['mailbox']}: FAILED: {r['error']}", err=True)
    sys.exit(1 if failed else 0)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def status(obj: Obj, as_json: bool) -> None:
    """Queue counts and, per IMAP mailbox, the last poll and the last error (auth failures
    included)."""
    from sqlalchemy import func, select

    from mailgw.intake.ledger import mailbox_statuses
    from mailgw.store.db import read_session
    from mailgw.store.models import Inbound, Outbox

    settings = obj.settings()
    engine = obj.engine()
    with read_session(engine) as s:
        inbound = dict(s.execute(select(Inbound.state, func.count()).group_by(Inbound.state)).all())
        outbox = dict(s.execute(select(Outbox.state, func.count()).group_by(Outbox.state)).all())
    known = {r["mailbox"]: r for r in mailbox_statuses(engine)}
    boxes = []
    for mb in settings.mailboxes:
        r = known.get(mb.name, {"mailbox": mb.name, "last_poll_at": None, "last_ok_at": None,
                                "last_error": None, "last_error_at": None, "ingested": 0,
                                "ledger": 0, "poller": None})
        boxes.append({**{k: (_iso(v) if isinstance(v, datetime) else v) for k, v in r.items()},
                      "queue": mb.queue, "host": f"{mb.host}:{mb.real_port}"})
    data = {"inbound": {k: inbound.get(k, 0) for k in ("pending", "done", "quarantined")},
            "outbox": {k: outbox.get(k, 0) for k in ("pending", "sent", "dead")},
            "mailboxes": boxes}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    i, o = data["inbound"], data["outbox"]
    click.echo(f"inbound: {i['pending']} pending, {i['done']} done, {i['quarantined']} quarantined")
    click.echo(f"outbox:  {o['pending']} pending, {o['sent']} sent, {o['dead']} dead")
    for b in boxes:
        state = "ERROR" if b["last_error"] else ("ok" if b["last_ok_at"] else "never polled")
        click.echo(f"mailbox {b['mailbox']} ({b['host']} -> queue {b['queue']}): {state}; "
                   f"last poll {b['last_poll_at'] or '-'}, last ok {b['last_ok_at'] or '-'}, "
                   f"{b['ingested']} taken in, poller {b['poller'] or '-'}")
        if b["last_error"]:
            click.echo(f"  last error at {b['last_error_at']}: {b['last_error']}")


@main.group()
def sla() -> None:
    """SLA escalations (docs/sla-escalations.md)."""


@sla.command("sweep")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def sla_sweep(obj: Obj, as_json: bool) -> None:
    """Run the escalation sweep once now: fire every warning and breach that is due (each
    exactly once, also beside a running gateway) and print what fired. For cron and tests."""
    from mailgw.outbound.render import Renderer
    from mailgw.sla.sweep import sweep

    settings = obj.settings()
    engine = obj.engine()
    try:
        result = sweep(engine, settings, Renderer(obj.home.templates))
    finally:
        engine.dispose()
    if as_json:
        click.echo(json.dumps(result.as_json(), indent=2))
        return
    for f in result.fired:
        to = ", ".join(f.recipients) or "nobody (event sla_notice_unaddressed)"
        done = "; ".join(f"{k} {v[0]} -> {v[1]}" for k, v in f.changes.items())
        click.echo(f"{f.ticket}: {f.sla} {f.target} {f.kind} {f.percent}% "
                   f"(reached {f.reached_at}) to {to}" + (f"; {done}" if done else ""))
    for d in result.deferred:
        click.echo(f"clock {d['clock_id']}: {d['percent']}% deferred to {d['until']} "
                   "(outside working hours)")
    click.echo(f"{len(result.fired)} fired, {len(result.deferred)} deferred, "
               f"{len(result.skipped)} skipped")


@sla.command("apply")
@click.option("--ticket", "numbers", multiple=True, metavar="NUMBER",
              help="Only this ticket (repeatable); default every ticket not closed.")
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def sla_apply(obj: Obj, numbers: tuple[str, ...], dry_run: bool, as_json: bool) -> None:
    """Put the slas: of config/mailgw.yaml in force on the open tickets: choose each one's
    SLA again, start the clocks of an SLA that now applies from the ticket's history,
    switch clocks to an edited goal or calendar, cancel those of an SLA that no longer
    applies. Safe beside a running gateway (docs/sla.md)."""
    from mailgw.sla.apply import apply_slas

    settings = obj.settings()
    engine = obj.engine()
    try:
        result = apply_slas(engine, settings, dry_run=dry_run,
                            numbers=[_number(obj, n) for n in numbers] if numbers else None)
    finally:
        engine.dispose()
    if as_json:
        click.echo(json.dumps(result.as_json(), indent=2))
        return
    for c in result.changes:
        done = "; ".join(f"{what} {', '.join(items)}" for what, items in (
            ("started", c.started), ("switched", c.retargeted), ("cancelled", c.cancelled),
            ("paused", c.paused), ("resumed", c.resumed)) if items)
        click.echo(f"{c.ticket}: SLA {c.sla[0] or '-'} -> {c.sla[1] or '-'}"
                   + (f" ({c.reason})" if c.reason and c.sla[0] != c.sla[1] else "")
                   + (f": {done}" if done else ""))
    for n in result.skipped:
        click.echo(f"{n}: skipped (no such ticket, or closed, merged or deleted)")
    verb = "would change" if dry_run else "changed"
    click.echo(f"{result.checked} ticket(s) checked, {len(result.changes)} {verb}")


# SLA reports (issue 6): mailgw/sla/report.py, docs/reports.md.
@main.group()
def report() -> None:
    """Reports over the store (read only)."""


@report.command("sla")
@click.option("--from", "date_from", required=True, metavar="DATE",
              help="First day (YYYY-MM-DD, midnight in --tz) or ISO 8601 date-time; included.")
@click.option("--to", "date_to", required=True, metavar="DATE",
              help="End day or date-time; excluded (--from 2026-11-01 --to 2026-12-01: November).")
@click.option("--tz", default="UTC", show_default=True, metavar="ZONE",
              help="Time zone of --from/--to and of the days in the chart (IANA name).")
@click.option("--queue", "queues", multiple=True, metavar="Q",
              help="Only tickets in this queue (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "html"]),
              default="table", show_default=True)
@click.option("--period", type=click.Choice(["auto", "day", "week"]), default="auto",
              show_default=True, help="Compliance over time per day or ISO week (auto: per day "
                                      "up to 62 days).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True),
              help="Write to this file instead of standard output.")
@click.pass_obj
def report_sla(obj: Obj, date_from: str, date_to: str, tz: str, queues: tuple[str, ...],
               fmt: str, period: str, output: str | None) -> None:
    """SLA compliance of the tickets created in [--from, --to): met, breached and open clocks,
    compliance %, median and p90 times per target, per queue and priority. Exit 0 ok, 2 usage
    error, 1 store error."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from sqlalchemy.exc import SQLAlchemyError

    from mailgw.sla.report import ReportError, build_report, parse_when, render
    from mailgw.store.db import read_session

    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise click.BadParameter(f"unknown time zone {tz!r} (an IANA name such as "
                                 "Europe/Berlin or UTC)", param_hint="--tz") from None
    try:
        start = parse_when(date_from, zone, option="--from")
        end = parse_when(date_to, zone, option="--to")
    except ReportError as exc:
        raise click.UsageError(str(exc)) from None
    if end <= start:
        raise click.UsageError(f"--to {date_to} is not after --from {date_from}: the range "
                               "[from, to) is empty")
    settings = obj.settings()
    try:
        with read_session(obj.engine()) as s:
            data = build_report(s, settings, start=start, end=end, tz=tz, queues=queues,
                                period=period)
    except SQLAlchemyError as exc:
        from sqlalchemy.engine import make_url

        where = make_url(obj.home.store_url(settings)).render_as_string(hide_password=True)
        click.echo(f"mailgw report sla: store error ({where}): "
                   f"{type(exc).__name__}: {str(exc).splitlines()[0]}", err=True)
        sys.exit(1)
    text = render(data, fmt)
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        click.echo(f"mailgw report sla: cannot write {output}: {exc.strerror}", err=True)
        sys.exit(1)
    click.echo(f"wrote {output}", err=True)
