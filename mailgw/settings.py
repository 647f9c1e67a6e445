"""Load and validate the gateway settings in ``config/mailgw.yaml``.

The file is parsed with PyYAML's node API so that every value keeps the line it came from;
pydantic validates the data, and each error is reported as ``file:line: path: reason`` so an
admin can go straight to the bad value. A file that fails validation is refused as a whole:
callers keep whatever settings they already run with.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mailgw.calendar import WEEKDAYS, CalendarConfig, WorkingHours

Level = Literal["high", "medium", "low"]

CONFIG_FILE = "config/mailgw.yaml"


class _Strict(BaseModel):
    # Unknown keys are refused: a typo in a key must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


class Listener(_Strict):
    listen: str = "127.0.0.1:2525"
    max_message_size: int = Field(default=50 * 1024 * 1024, gt=0)
    hostname: str | None = None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: str) -> str:
        return _host_port(v)


class Relay(_Strict):
    host: str
    port: int = Field(default=25, gt=0, lt=65536)
    starttls: bool = False
    ssl: bool = False
    username: str | None = None
    password: str | None = None
    timeout: float = Field(default=30.0, gt=0)


def _addresses(v: list[str]) -> list[str]:
    """Email addresses, lower-cased; anything without an @ is refused."""
    for a in v:
        if "@" not in a:
            raise ValueError(f"not an email address: {a!r}")
    return [a.strip().lower() for a in v]


class Queue(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    addresses: list[str] = Field(min_length=1)
    # The address our replies come from; defaults to the first served address.
    sender: str | None = None
    sender_name: str | None = None
    auto_response: bool = True
    # What a reply to a closed ticket does: reopen it (OTRS default), open a new ticket, or be
    # stored without touching the ticket.
    on_closed_reply: Literal["reopen", "new_ticket", "reject"] = "reopen"
    # Who gets a new ticket in this queue (issue 4; see docs/filters.md).
    assignment: Assignment | None = None

    @field_validator("addresses")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return _addresses(v)

    @property
    def from_address(self) -> str:
        return self.sender or self.addresses[0]


class Assignment(_Strict):
    """Auto-assignment of new tickets in a queue (mailgw/assign.py)."""

    strategy: Literal["round_robin", "least_open", "skills"] = "round_robin"
    # A follow-up keeps its owner anyway; sticky also gives a known customer's new ticket to
    # the owner of their last ticket, when that agent is available.
    sticky: bool = False
    # Agents taking part; default: every agent that lists this queue.
    agents: list[str] | None = None


# The commands an agent can give by mail (mailgw/agent_commands.py); `Agent.commands` names
# them without the '#'. Aliases (#reopen = #open, #untag = #tag) are allowed with their command.
AGENT_COMMANDS = ("close", "pending", "open", "assign", "take", "priority", "queue", "tag",
                  "merge")
AGENT_COMMAND_ALIASES = {"reopen": "open", "untag": "tag"}


class Agent(_Strict):
    """A person working tickets. Also used to recognise agents' mail by their addresses."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]+$")
    addresses: list[str] = []
    queues: list[str] = []
    skills: list[str] = []
    calendar: str | None = None  # a name from calendars:
    working_hours: WorkingHours | None = None  # or inline hours (calendar wins if both)
    out_of_office: bool = False
    # Commands by mail (docs/agent-commands.md): the ones this agent may use (None: all), and
    # the queues, besides their own, they may move a ticket to with #queue.
    commands: list[str] | None = None
    move_to: list[str] = []

    @field_validator("addresses")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return _addresses(v)

    @field_validator("commands")
    @classmethod
    def _known_commands(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        names = [c.strip().lower().lstrip("#") for c in v]
        # An alias stands for its command; #note is always allowed, so listing it is harmless.
        names = [AGENT_COMMAND_ALIASES.get(c, c) for c in names if c != "note"]
        unknown = [c for c in names if c not in AGENT_COMMANDS]
        if unknown:
            raise ValueError(f"unknown command(s) {', '.join(unknown)}; "
                             f"known: {', '.join(AGENT_COMMANDS)}")
        return list(dict.fromkeys(names))


# Ticket states an SLA clock may pause in (``pause_states``); closed stops the clocks and
# merged cancels them, so neither can pause.
SLA_PAUSE_STATES = ("new", "open", "pending")


class SlaActions(_Strict):
    """What an escalation level does to the ticket besides notifying (mailgw/sla)."""

    priority: int | Literal["raise"] | None = None  # set 1..5, or "raise" one step (to 1)
    assign: str | None = None  # an agent's name, or "queue" to re-run the queue's assignment
    tags: list[str] = []

    @field_validator("priority")
    @classmethod
    def _prio(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and not 1 <= v <= 5:
            raise ValueError("priority must be 1 (highest) to 5, or 'raise'")
        return v


class SlaLevel(_Strict):
    """A warning (percent < 100) or the breach (100) of an SLA target, and who hears of it:
    ``owner``, ``queue_agents`` or an e-mail address."""

    percent: int = Field(ge=1, le=1000)
    notify: list[str] = ["owner"]
    template: str | None = None  # default: sla_warning (< 100) / sla_breach (>= 100)
    actions: SlaActions = SlaActions()


class SlaSelect(_Strict):
    """Which tickets an SLA covers; every listed criterion must match, an empty one matches all.
    ``customers`` are shell patterns (``*@bigcorp.com``)."""

    queues: list[str] = []
    priorities: list[int] = []
    customers: list[str] = []
    companies: list[str] = []


class Sla(_Strict):
    """An SLA definition (``slas:`` in config/mailgw.yaml, docs/sla.md). Targets in minutes:
    business minutes of ``calendar``, or calendar minutes (24x7) without one. The first SLA
    whose ``applies_to`` matches a ticket is used, unless a filter rule sets ``sla``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    calendar: str | None = None
    first_response: int | None = Field(default=None, gt=0)
    update: int | None = Field(default=None, gt=0)
    solution: int | None = Field(default=None, gt=0)
    pause_states: list[str] = ["pending"]
    applies_to: SlaSelect | None = None  # None: any ticket (a catch-all, put it last)
    levels: list[SlaLevel] = Field(default_factory=lambda: [
        SlaLevel(percent=75), SlaLevel(percent=100)])
    # A notice due outside the calendar's working time waits for the next working period.
    defer_outside_hours: bool = True

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[SlaLevel]) -> list[SlaLevel]:
        percents = [lv.percent for lv in v]
        if percents != sorted(set(percents)):
            raise ValueError("levels must be in increasing order of percent, each once")
        return v


class PriorityMatrix(_Strict):
    """ITIL priority from urgency x impact; 1 is the most urgent, 5 the least."""

    default: int = Field(default=3, ge=1, le=5)
    matrix: dict[Level, dict[Level, int]] = Field(default_factory=lambda: {
        "high": {"high": 1, "medium": 2, "low": 3},
        "medium": {"high": 2, "medium": 3, "low": 4},
        "low": {"high": 3, "medium": 4, "low": 5},
    })

    @field_validator("matrix")
    @classmethod
    def _complete(cls, v: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        for urgency in ("high", "medium", "low"):
            for impact in ("high", "medium", "low"):
                p = v.get(urgency, {}).get(impact)
                if p is None:
                    raise ValueError(f"missing urgency {urgency} x impact {impact}")
                if not 1 <= p <= 5:
                    raise ValueError(f"priority {p} for {urgency} x {impact} is not 1..5")
        return v


class TicketNumbers(_Strict):
    hook: str = "Ticket#"
    system_id: str = Field(default="10", pattern=r"^[0-9]{1,6}$")
    # OTRS "Date" generator: YYYYMMDD + system id + counter; "counter": system id + counter.
    generator: Literal["date", "counter"] = "date"
    min_counter_digits: int = Field(default=5, ge=1, le=12)


class Worker(_Strict):
    batch_size: int = Field(default=64, ge=1, le=5000)
    poll_interval: float = Field(default=0.5, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    # Seconds a reply that refers to no message the store has (no article, no inbound row)
    # waits from its arrival before it opens a ticket: its original may have been sent at
    # the same moment on another connection (docs/architecture.md decision 31); 0: no wait.
    orphan_reply_wait: float = Field(default=2.0, ge=0, le=60)
    # Worker processes `mailgw run` starts (its --workers overrides): 0 runs the worker as a
    # thread of the gateway process; "auto" picks by the cores this process may use and the
    # store (``worker_processes``; docs/architecture.md decision 39).
    processes: int | Literal["auto"] = "auto"

    @field_validator("processes", mode="before")
    @classmethod
    def _processes(cls, v: object) -> object:
        return check_processes(v)


class Sender(_Strict):
    max_attempts: int = Field(default=8, ge=1)
    backoff_initial: float = Field(default=30.0, gt=0)
    backoff_max: float = Field(default=3600.0, gt=0)
    poll_interval: float = Field(default=1.0, gt=0)


class MachineMail(_Strict):
    """Machine mail (docs/machine-mail.md): bounce tracking and our signed identifiers."""

    # Key for the HMAC in VERP return paths and in our Message-IDs. `mailgw init` writes a
    # random one; without it a key is derived from hostname and queue addresses (stable, but
    # guessable by anyone who knows them: set one, the same on every node).
    secret: str | None = Field(default=None, min_length=16)
    # Envelope sender of our outgoing mail: bounces+TOKEN@<domain of the queue address>.
    verp: bool = True
    verp_local: str = Field(default="bounces", pattern=r"^[A-Za-z0-9._-]{1,40}$")


class LoopProtection(_Strict):
    """Rate limits for automatic mail (acknowledgements, notices); 0 sends none."""

    max_per_sender: int = Field(default=40, ge=0)  # per recipient address and window (OTRS: 40)
    max_per_ticket: int = Field(default=20, ge=0)  # per ticket and window
    window_hours: float = Field(default=24.0, gt=0)
    # No automatic mail to an address our mail bounced from permanently (5.x.x), or whose
    # owner reported our mail as abuse (ARF), for this many days; 0: no hold.
    bounce_hold_days: float = Field(default=7.0, ge=0)
    complaint_hold_days: float = Field(default=365.0, ge=0)


class OAuth2(_Strict):
    """XOAUTH2 bearer token: printed by ``token_command`` or read from ``token_file``; plain
    text, or JSON with ``access_token`` and ``expires_in`` (seconds) or ``expires_at`` (epoch)."""

    token_command: str | None = None
    token_file: str | None = None
    refresh_before: float = Field(default=300.0, ge=0)  # seconds before expiry to refresh
    lifetime: float = Field(default=3600.0, gt=0)  # assumed when the token does not say

    @model_validator(mode="after")
    def _one_source(self) -> OAuth2:
        if (self.token_command is None) == (self.token_file is None):
            raise ValueError("give exactly one of token_command or token_file")
        return self


class Mailbox(_Strict):
    """An IMAP mailbox mailgw reads instead of (or besides) receiving by SMTP."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]+$")
    host: str
    port: int | None = Field(default=None, gt=0, lt=65536)  # default: 993 imaps, else 143
    tls: Literal["imaps", "starttls", "plain"] = "imaps"
    folders: list[str] = Field(default=["INBOX"], min_length=1)
    username: str
    password: str | None = None
    password_file: str | None = None
    oauth2: OAuth2 | None = None
    queue: str
    poll_interval: float = Field(default=60.0, gt=0)
    idle: bool = True  # use IMAP IDLE when the server offers it
    after: Literal["move", "flag", "delete"] = "move"
    move_to: str = "Processed"
    batch_size: int = Field(default=50, ge=1, le=1000)
    timeout: float = Field(default=60.0, gt=0)
    ca_file: str | None = None  # PEM CA(s) trusted instead of the system's (relative: home)

    @model_validator(mode="after")
    def _check(self) -> Mailbox:
        creds = [x for x in (self.password, self.password_file, self.oauth2) if x is not None]
        if len(creds) != 1:
            raise ValueError("give exactly one of password, password_file or oauth2")
        if self.tls == "plain" and self.host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("tls: plain sends the password in clear; allowed only for a "
                             "loopback host (127.0.0.1, ::1, localhost)")
        if self.ca_file is not None and self.tls == "plain":
            raise ValueError("ca_file is for tls: imaps or starttls; tls: plain has no TLS")
        if self.after == "move" and self.move_to in self.folders:
            raise ValueError(f"move_to {self.move_to!r} is also a folder that is read")
        return self

    @property
    def real_port(self) -> int:
        return self.port or (993 if self.tls == "imaps" else 143)


class SlaSweep(_Strict):
    """The escalation sweep (mailgw/sla/sweep.py): how often the scheduler runs it and how
    many due clocks one transaction takes."""

    interval: float = Field(default=30.0, gt=0)  # seconds
    batch_size: int = Field(default=200, ge=1, le=10000)
class AgentMailKey(_Strict):
    """One key for agents' signed reply addresses. The first key signs; every listed key
    verifies, so a key is rotated by adding the new one first and dropping the old one once
    its addresses may expire (``max_age_days``)."""

    id: str = Field(pattern=r"^[a-z0-9]{1,8}$")
    secret: str = Field(min_length=16)


class AgentMailNotify(_Strict):
    """Who is told of customer mail (OTRS's defaults): a new ticket goes to every agent of
    its queue, a follow-up to the ticket's owner, or to the queue's agents when it has none."""

    new_ticket: Literal["queue_agents", "owner", "none"] = "queue_agents"
    followup: Literal["owner_or_queue", "queue_agents", "owner", "none"] = "owner_or_queue"


class AgentMail(_Strict):
    """Agents working tickets from their own mail client (docs/agent-mail.md). Off without
    ``keys``: no notifications, and ``+t.``/``+c.`` addresses are plain queue mail."""

    keys: list[AgentMailKey] = []
    max_age_days: int = Field(default=30, ge=1, le=3650)  # a reply address expires after
    notify: AgentMailNotify = AgentMailNotify()
    # Also demand a DKIM (aligned with From) or DMARC pass from the trusted MTA's
    # Authentication-Results header (its ``authserv_id``) before trusting an agent's mail.
    require_auth: Literal["none", "dkim", "dmarc"] = "none"
    authserv_id: str | None = None
    # Mail with an agent's From but no valid reply address: processed as customer mail
    # (and logged), or refused (quarantined, logged).
    forged: Literal["customer", "refuse"] = "customer"

    @model_validator(mode="after")
    def _check(self) -> AgentMail:
        ids = [k.id for k in self.keys]
        if len(set(ids)) != len(ids):
            raise ValueError("agent_mail.keys: key ids must be unique")
        if self.require_auth != "none" and not self.authserv_id:
            raise ValueError(f"require_auth: {self.require_auth} needs authserv_id (the "
                             "trusted MTA's id in Authentication-Results)")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.keys)


def _unique(names: list[str], what: str) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{what} must be unique, repeated: {', '.join(dupes)}")


class Settings(_Strict):
    store_url: str | None = None  # default: SQLite in the home's store/
    smtp: Listener = Listener()
    lmtp: Listener | None = None
    relay: Relay | None = None  # None: outgoing mail is written to store/outbox/ as .eml files
    hostname: str = "mailgw.localdomain"  # right-hand side of our Message-IDs
    ticket_numbers: TicketNumbers = TicketNumbers()
    queues: list[Queue] = Field(min_length=1)
    default_queue: str | None = None  # catch-all for recipients no queue lists
    worker: Worker = Worker()
    sender: Sender = Sender()
    loop_header: str = "X-Loop"
    machine_mail: MachineMail = MachineMail()
    loop_protection: LoopProtection = LoopProtection()
    # Filter pipelines, agents and calendars (issue 4; docs/filters.md).
    filters_dir: str = "filters"
    filters_reload_interval: float = Field(default=2.0, ge=0)
    calendars: list[CalendarConfig] = []
    agents: list[Agent] = []
    priority: PriorityMatrix = PriorityMatrix()
    mailboxes: list[Mailbox] = []  # IMAP intake (mailgw/intake/imap.py)
    slas: list[Sla] = []  # SLA definitions (mailgw/sla, docs/sla.md)
    sla_sweep: SlaSweep = SlaSweep()  # the escalation sweep (docs/sla-escalations.md)
    agent_mail: AgentMail = AgentMail()  # agents' replies by mail (docs/agent-mail.md)

    @model_validator(mode="after")
    def _check_agents(self) -> Settings:
        queues = {q.name for q in self.queues}
        calendars = {c.name for c in self.calendars}
        agents = [a.name for a in self.agents]
        _unique(agents, "agent names")
        for a in self.agents:
            for q in a.queues:
                if q not in queues:
                    raise ValueError(f"agent {a.name}: unknown queue {q!r}")
            if a.calendar is not None and a.calendar not in calendars:
                raise ValueError(f"agent {a.name}: unknown calendar {a.calendar!r}")
            for q in a.move_to:
                if q not in queues:
                    raise ValueError(f"agent {a.name}: move_to names unknown queue {q!r}")
        for q in self.queues:
            for name in (q.assignment.agents or []) if q.assignment else []:
                if name not in agents:
                    raise ValueError(f"queue {q.name}: assignment names unknown agent {name!r}")
        return self

    @model_validator(mode="after")
    def _check_slas(self) -> Settings:
        queues = {q.name for q in self.queues}
        calendars = {c.name for c in self.calendars}
        agents = {a.name for a in self.agents}
        names = [s.name for s in self.slas]
        _unique(names, "SLA names")
        for i, sla in enumerate(self.slas):
            where = f"slas[{i}] {sla.name}"
            if sla.first_response is None and sla.update is None and sla.solution is None:
                raise ValueError(f"{where}: give at least one of first_response, update, "
                                 "solution (minutes)")
            if sla.calendar is not None and sla.calendar not in calendars:
                raise ValueError(f"{where}: unknown calendar {sla.calendar!r} (calendars: "
                                 f"{', '.join(sorted(calendars)) or 'none'})")
            cal = next((c for c in self.calendars if c.name == sla.calendar), None)
            if cal is not None and not any(getattr(cal, d) for d in WEEKDAYS):
                # its clocks could never count a second: refused here, not on the hot path
                raise ValueError(f"{where}: calendar {cal.name!r} has no working hours")
            for q in sla.applies_to.queues if sla.applies_to else []:
                if q not in queues:
                    raise ValueError(f"{where}: applies_to names unknown queue {q!r}")
            for st in sla.pause_states:
                if st not in SLA_PAUSE_STATES:
                    raise ValueError(f"{where}: pause_states: {st!r} is not a state a clock "
                                     f"can pause in ({', '.join(SLA_PAUSE_STATES)})")
            for j, lv in enumerate(sla.levels):
                who = lv.actions.assign
                if who is not None and who != "queue" and who not in agents:
                    raise ValueError(f"{where}: levels[{j}] assign: unknown agent {who!r} "
                                     "(an agent's name, or queue)")
        return self

    def agent(self, name: str) -> Agent | None:
        for a in self.agents:
            if a.name == name:
                return a
        return None

    @model_validator(mode="after")
    def _check_queues(self) -> Settings:
        names = [q.name for q in self.queues]
        _unique(names, "queue names")
        seen: dict[str, str] = {}
        for q in self.queues:
            for a in q.addresses:
                if a in seen:
                    raise ValueError(f"address {a} is served by both {seen[a]} and {q.name}")
                seen[a] = q.name
        if self.default_queue is not None and self.default_queue not in names:
            raise ValueError(f"default_queue {self.default_queue!r} is not a configured queue")
        for mb in self.mailboxes:
            if mb.queue not in names:
                raise ValueError(f"mailbox {mb.name}: queue {mb.queue!r} is not a configured queue")
        boxes = [mb.name for mb in self.mailboxes]
        if len(set(boxes)) != len(boxes):
            raise ValueError("mailbox names must be unique")
        return self

    def queue(self, name: str) -> Queue | None:
        for q in self.queues:
            if q.name == name:
                return q
        return None

    def queue_for_recipient(self, address: str) -> Queue | None:
        """The queue serving an envelope recipient; ``+detail`` is ignored (RFC 5233)."""
        address = address.strip().strip("<>").lower()
        local, _, domain = address.rpartition("@")
        base = f"{local.split('+', 1)[0]}@{domain}"
        for q in self.queues:
            if address in q.addresses or base in q.addresses:
                return q
        return self.queue(self.default_queue) if self.default_queue else None


@dataclass(frozen=True)
class Home:
    """The directory holding ``config/ filters/ templates/ store/``."""

    path: Path

    @classmethod
    def resolve(cls, home: str | os.PathLike[str] | None) -> Home:
        return cls(Path(home or os.environ.get("MAILGW_HOME") or ".").resolve())

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def templates(self) -> Path:
        return self.path / "templates"

    def filters_dir(self, settings: Settings) -> Path:
        return self.path / settings.filters_dir

    @property
    def store(self) -> Path:
        return self.path / "store"

    @property
    def outbox_dir(self) -> Path:
        return self.store / "outbox"

    def store_url(self, settings: Settings) -> str:
        if settings.store_url:
            return settings.store_url
        return f"sqlite:///{self.store / 'mailgw.db'}"


class ConfigError(Exception):
    """A config file was refused; ``errors`` holds one ``file:line: path: reason`` per problem."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


def _node_lines(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    """Record the 1-based line of every value (and of every key) under ``node``."""
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value
            out[path + (k, "__key__")] = key.start_mark.line + 1
            _node_lines(value, path + (k,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_lines(item, path + (i,), out)


def _format_loc(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def load_yaml_with_lines(path: Path) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """Parse a YAML file; returns the data and a map from value path to line number."""
    label = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{label}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{label}: cannot read: {exc}"]) from None
    try:
        # One parse: compose the node tree (which keeps line numbers), then build the data
        # from that same tree.
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{label}:{mark.line + 1}" if mark else label
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from None
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _node_lines(node, (), lines)
    return data, lines


def validation_errors(
    exc: ValidationError, label: str, lines: dict[tuple[Any, ...], int]
) -> list[str]:
    """Turn pydantic errors into ``file:line: path: reason`` lines."""
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        line = None
        if err["type"] == "extra_forbidden":
            line = lines.get(loc + ("__key__",))
        probe = loc
        while line is None and probe:
            line = lines.get(probe)
            probe = probe[:-1]
        line = line or lines.get(())
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        msg = re.sub(r"^Value error, ", "", msg)
        where = f"{label}:{line}" if line else label
        out.append(f"{where}: {_format_loc(loc)}: {msg}")
    return out


def display_path(path: Path) -> str:
    """A path as an admin wants to read it: relative to the current directory when inside it."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def load_settings(home: Home) -> Settings:
    """Read and validate ``config/mailgw.yaml``; raises ConfigError naming file, line and path."""
    label = display_path(home.config_file)
    data, lines = load_yaml_with_lines(home.config_file)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{label}:1: (top level): expected a mapping of settings"])
    try:
        # The home: relative paths in the settings (holidays_ics) are read from it.
        return Settings.model_validate(data, context={"home": home.path})
    except ValidationError as exc:
        raise ConfigError(validation_errors(exc, label, lines)) from None


_T = TypeVar("_T")


def per_settings(build: Callable[[Settings], _T]) -> Callable[[Settings], _T]:
    """Cache what ``build`` derives from a Settings object, once per object: settings are
    not changed after load (a reload makes a new object), and pydantic models are not
    hashable, so the cache is keyed by identity and checks it is the same object."""
    cache: dict[int, tuple[Settings, _T]] = {}

    def get(settings: Settings) -> _T:
        hit = cache.get(id(settings))
        if hit is not None and hit[0] is settings:
            return hit[1]
        value = build(settings)
        if len(cache) > 16:
            cache.clear()
        cache[id(settings)] = (settings, value)
        return value

    get.__doc__ = build.__doc__
    return get


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process may use: its affinity mask (a container's CPU set), bounded by
    its cgroup's CPU quota (``docker --cpus``, a Kubernetes CPU limit: cgroup v2's
    ``cpu.max``, "QUOTA PERIOD" or "max PERIOD"), rounded up; not the machine's count."""
    try:
        cores = len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):  # no cgroup v2 here, or a line it cannot read
        pass
    return cores


def check_processes(v: object) -> int | str:
    """A ``worker.processes`` / ``mailgw run --workers`` value: 0 to 64, or ``auto``."""
    if v == "auto":
        return "auto"
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 64:
        raise ValueError("processes must be a number from 0 to 64, or 'auto'")
    return v


def worker_processes(setting: int | str, *, sqlite: bool, cores: int | None = None) -> int:
    """What ``worker.processes`` (or ``mailgw run --workers``) means on this machine.

    ``auto``: on one core the worker runs as a thread (0: no second interpreter to feed); on
    SQLite one worker process (one writer at a time: a second worker process measured slower
    than one on two cores, bench/RESULTS.md session 7, and more workers only queue for the
    lock); on PostgreSQL one process a core beside the gateway's, at most 8."""
    if setting != "auto":
        return int(setting)
    cores = usable_cores() if cores is None else cores
    if cores < 2:
        return 0
    return 1 if sqlite else min(cores - 1, 8)
