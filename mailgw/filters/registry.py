"""Plugin conditions and actions, registered by entry point.

A package adds a condition by declaring an entry point in the group
``mailgw.filter_conditions`` (actions: ``mailgw.filter_actions``) whose name is the key used
in filter files and whose object is a *factory*: called once at load with the value written
in the file, it returns the function run per message, or raises ValueError (the loader
reports it with the file, rule and key). A condition function takes the message view
(``mailgw.filters.engine.MessageView``) and returns a bool; an action function takes the
view and the ``Decision`` and changes the decision. A factory may carry a ``json_schema``
dict describing its value, which ``mailgw filters schema`` includes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

log = logging.getLogger(__name__)

CONDITION_GROUP = "mailgw.filter_conditions"
ACTION_GROUP = "mailgw.filter_actions"

Factory = Callable[[Any], Callable[..., Any]]


@dataclass
class Registry:
    conditions: dict[str, Factory] = field(default_factory=dict)
    actions: dict[str, Factory] = field(default_factory=dict)
    # Entry points that could not be loaded: reported by ``filters check``, not fatal for
    # files that do not use them.
    broken: dict[str, str] = field(default_factory=dict)

    def schemas(self, kind: str) -> dict[str, Any]:
        table = self.conditions if kind == "conditions" else self.actions
        return {name: getattr(f, "json_schema", {}) for name, f in table.items()}


def load_registry(builtin_names: frozenset[str] = frozenset()) -> Registry:
    """Every plugin installed in this environment. A plugin may not shadow a built-in key."""
    reg = Registry()
    for group, table in ((CONDITION_GROUP, reg.conditions), (ACTION_GROUP, reg.actions)):
        for ep in entry_points(group=group):
            label = f"{group}:{ep.name}"
            if ep.name in builtin_names or ep.name in table:
                reg.broken[label] = f"{ep.name!r} is already taken ({ep.value} ignored)"
                continue
            try:
                table[ep.name] = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the gateway
                reg.broken[label] = f"cannot load {ep.value}: {type(exc).__name__}: {exc}"
                log.error("filter plugin %s: %s", label, reg.broken[label])
    return reg
