"""Render mail templates and build outgoing messages.

A template is a Jinja2 file in ``templates/`` with two blocks, ``subject`` and ``body``.
Templates are compiled once (Jinja2 caches them in the Environment) and rendered with
``StrictUndefined``, so a typo in a variable is an error in ``config check`` and in tests, not
a blank in a customer's mail.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, TemplateError

REQUIRED = ("ack_new", "ack_followup", "reject_closed")


@dataclass(frozen=True)
class Rendered:
    subject: str
    body: str


class Renderer:
    def __init__(self, template_dir: Path):
        self.env = Environment(
            loader=FileSystemLoader(str(template_dir)),
            undefined=StrictUndefined,
            autoescape=False,  # plain-text mail
            keep_trailing_newline=True,
            auto_reload=False,
        )

    def render(self, name: str, context: dict[str, Any]) -> Rendered:
        tmpl = self.env.get_template(f"{name}.j2")
        ctx = tmpl.new_context(context)
        if "subject" not in tmpl.blocks or "body" not in tmpl.blocks:
            raise TemplateError(f"template {name}.j2 needs a 'subject' and a 'body' block")
        subject = "".join(tmpl.blocks["subject"](ctx)).strip()
        body = "".join(tmpl.blocks["body"](ctx)).strip("\n") + "\n"
        # A header must be one line: a template must not be able to inject headers.
        subject = " ".join(subject.split())
        return Rendered(subject, body)

    def check(self) -> list[str]:
        """Compile every template; returns problems as ``file:line: reason``."""
        errors = []
        for name in REQUIRED:
            try:
                tmpl = self.env.get_template(f"{name}.j2")
                if "subject" not in tmpl.blocks or "body" not in tmpl.blocks:
                    errors.append(f"templates/{name}.j2: needs a 'subject' and a 'body' block")
            except TemplateError as exc:
                line = getattr(exc, "lineno", None)
                where = f"templates/{name}.j2" + (f":{line}" if line else "")
                errors.append(f"{where}: {exc.message or exc}")  # type: ignore[attr-defined]
        return errors


def make_message_id(hostname: str, ticket_id: int | None) -> str:
    """A new bare Message-ID of ours (RFC 5322 3.6.4): unique, with our host on the right."""
    return f"mailgw.{ticket_id or 0}.{int(time.time())}.{secrets.token_hex(6)}@{hostname}"


def build_message(
    *,
    from_addr: str,
    from_name: str | None,
    to: list[str],
    subject: str,
    body: str,
    message_id: str,
    in_reply_to: str | None,
    references: list[str],
    extra_headers: dict[str, str],
) -> bytes:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = formataddr((from_name, from_addr)) if from_name else from_addr
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = f"<{message_id}>"
    if in_reply_to:
        msg["In-Reply-To"] = f"<{in_reply_to}>"
    if references:
        msg["References"] = " ".join(f"<{r}>" for r in references)
    for name, value in extra_headers.items():
        msg[name] = value
    msg.set_content(body, charset="utf-8")
    return msg.as_bytes()
