"""What happens to a ticket, told to the parts that follow tickets (SLA clocks, issue 6).

The worker (incoming mail), agent mail (issue 7: replies, notes, commands) and escalation
actions call these two functions inside their own transaction, after the ticket and article
rows are flushed; nothing here commits. Listeners must be cheap: they run on the hot path.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from mailgw.settings import Settings
    from mailgw.store import models as m


def article_added(session: Session, settings: Settings, ticket: m.Ticket, article: m.Article,
                  *, new_ticket: bool, at: datetime) -> None:
    """An article was stored on ``ticket``: incoming customer mail (``direction="in"``,
    ``sender_type="customer"``), an agent's answer (``"out"``/``"agent"``), an internal note
    (``sender_type="agent"`` with ``internal``) or a system mail. ``new_ticket``: the article
    opened the ticket. Called after the ticket's queue/priority/state are final for it."""
    if not settings.slas and ticket.sla is None:
        return  # no SLA: nothing more than this settings lookup on the hot path
    from mailgw.sla.clocks import on_article

    on_article(session, settings, ticket, article, new_ticket=new_ticket, at=at)


def ticket_changed(session: Session, settings: Settings, ticket: m.Ticket,
                   changes: dict[str, tuple[Any, Any]], *, at: datetime,
                   reason: str = "") -> None:
    """Ticket attributes changed outside an article: ``changes`` maps a column (``state``,
    ``priority``, ``queue``, ``owner``, ``tags``…) to ``(old, new)``. ``reason`` says who or
    what changed it (an agent command, an escalation action, a filter rule)."""
    if not settings.slas and ticket.sla is None:
        return
    from mailgw.sla.clocks import on_change

    on_change(session, settings, ticket, changes, at=at, reason=reason)
