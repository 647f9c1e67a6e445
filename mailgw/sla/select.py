"""Which SLA covers a ticket, and why: a filter rule's ``sla:`` action wins, else the first
entry of ``slas:`` whose ``applies_to`` matches. Pure and in memory: it runs for every new
ticket on the worker's hot path."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from mailgw.settings import Settings, Sla, SlaSelect, per_settings

if TYPE_CHECKING:
    from mailgw.store import models as m

RULE_PREFIX = "rule "


@per_settings
def _by_name(settings: Settings) -> dict[str, Sla]:
    return {s.name: s for s in settings.slas}


def sla_by_name(settings: Settings, name: str | None) -> Sla | None:
    return _by_name(settings).get(name) if name is not None else None


def _why(sel: SlaSelect | None, ticket: m.Ticket) -> str | None:
    """What of ``ticket`` matched ``sel`` in words, or None when it does not match."""
    if sel is None:
        return "applies to every ticket"
    parts = []
    if sel.queues:
        if ticket.queue not in sel.queues:
            return None
        parts.append(f"queue {ticket.queue}")
    if sel.priorities:
        if ticket.priority not in sel.priorities:
            return None
        parts.append(f"priority {ticket.priority}")
    if sel.customers:
        customer = (ticket.customer or "").lower()
        hit = next((p for p in sel.customers if fnmatchcase(customer, p.lower())), None)
        if hit is None:
            return None
        parts.append(f"customer {customer} matches {hit}")
    if sel.companies:
        company = (ticket.company or "").lower()
        if company not in {c.lower() for c in sel.companies}:
            return None
        parts.append(f"company {ticket.company}")
    return ", ".join(parts) or "applies to every ticket"


def select_sla(settings: Settings, ticket: m.Ticket) -> tuple[Sla | None, str | None]:
    """The SLA for ``ticket`` and the reason (``"rule vip"``, ``"slas[0] standard: queue
    support"``); (None, None) when none applies. A rule's choice is kept in ``ticket.sla``
    with a reason starting ``rule ``; it stays until a rule chooses another."""
    if ticket.sla and (ticket.sla_reason or "").startswith(RULE_PREFIX):
        chosen = sla_by_name(settings, ticket.sla)
        if chosen is not None:
            return chosen, ticket.sla_reason
    for i, sla in enumerate(settings.slas):
        why = _why(sla.applies_to, ticket)
        if why is not None:
            return sla, f"slas[{i}] {sla.name}: {why}"
    return None, None
