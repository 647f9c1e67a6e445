"""Load ``filters/*.yaml`` into a compiled ``Pipeline``, or refuse it with exact errors.

Files run in file-name order (``00-default.yaml`` before ``10-routing.yaml``); rules in the
order they are written. Only ``*.yaml`` / ``*.yml`` directly in the directory are loaded, so
``filters/examples/`` can hold files to copy from. Each error reads
``FILE:LINE: rule 'NAME': FIELD: REASON``; one bad file refuses the whole pipeline, and the
caller keeps the one it runs with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mailgw.calendar import Calendar
from mailgw.filters.compile import Groups, Known, Problem, compile_actions, compile_condition
from mailgw.filters.engine import CompiledRule, Pipeline
from mailgw.filters.index import Index, anchor_of
from mailgw.filters.model import Actions, Condition, FilterFile, Rule
from mailgw.filters.registry import Registry, load_registry
from mailgw.settings import ConfigError, Settings, display_path, load_yaml_with_lines

# Keys a plugin may not take: every built-in condition and action.
BUILTIN_KEYS = frozenset(Condition.model_fields) | frozenset(
    f.alias for f in Condition.model_fields.values() if f.alias) | frozenset(Actions.model_fields)


class FilterError(ConfigError):
    """The filters were refused; ``errors`` holds one line per problem."""


def filter_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if p.suffix in (".yaml", ".yml") and p.is_file() and not p.name.startswith("."))


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """path -> (mtime in ns, size) of every filter file, and of the directory itself (files
    added or removed)."""
    out = {}
    for p in filter_files(directory) + ([directory] if directory.is_dir() else []):
        st = p.stat()
        out[str(p)] = (st.st_mtime_ns, st.st_size)
    return out


def _line(lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...], key: bool = False) -> int | None:
    if key and loc + ("__key__",) in lines:
        return lines[loc + ("__key__",)]
    probe = loc
    while probe:
        if probe in lines:
            return lines[probe]
        probe = probe[:-1]
    return lines.get(())


def _where(label: str, data: Any, lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...],
           key: bool = False) -> str:
    line = _line(lines, loc, key)
    head = f"{label}:{line}" if line else label
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        try:
            name = data["rules"][loc[1]].get("name")
        except (KeyError, IndexError, TypeError, AttributeError):
            name = None
        head += f": rule {name!r}" if name else f": rule #{loc[1] + 1}"
        field = ".".join(str(p) for p in loc[2:]) or "(rule)"
    else:
        field = ".".join(str(p) for p in loc) or "(top level)"
    return f"{head}: {field}"


def _pydantic(exc: ValidationError, label: str, data: Any, lines: dict[tuple[Any, ...], int],
              prefix: tuple[Any, ...]) -> list[str]:
    out = []
    for err in exc.errors():
        loc = prefix + tuple(err["loc"])
        unknown = err["type"] == "extra_forbidden"
        msg = "unknown key" if unknown else err["msg"].removeprefix("Value error, ")
        out.append(f"{_where(label, data, lines, loc, unknown)}: {msg}")
    return out


def _calendars(settings: Settings) -> dict[str, Calendar]:
    return {c.name: Calendar(c) for c in settings.calendars}


def template_names(templates_dir: Path | None) -> frozenset[str] | None:
    if templates_dir is None or not templates_dir.is_dir():
        return None
    return frozenset(p.stem for p in templates_dir.glob("*.j2"))


def load_pipeline(directory: Path, settings: Settings, templates_dir: Path | None = None,
                  registry: Registry | None = None) -> Pipeline:
    """Read, validate and compile every filter file; raises FilterError with all problems."""
    registry = registry if registry is not None else load_registry(BUILTIN_KEYS)
    known = Known(
        queues=frozenset(q.name for q in settings.queues),
        agents=frozenset(a.name for a in settings.agents),
        templates=template_names(templates_dir),
        calendars=_calendars(settings),
        registry=registry,
        slas=frozenset(s.name for s in settings.slas),
    )
    files = snapshot(directory)
    errors: list[str] = []
    rules: list[CompiledRule] = []
    seen: dict[str, str] = {}
    index = Index()
    for path in filter_files(directory):
        label = display_path(path)
        try:
            data, lines = load_yaml_with_lines(Path(label))  # errors name the path as shown
        except ConfigError as exc:
            errors += exc.errors
            continue
        if data is None:
            continue
        if not isinstance(data, dict):
            errors.append(f"{label}:1: (top level): expected a mapping with `rules:`")
            continue
        # Each rule is validated on its own, so one run reports the problems of every rule.
        shell = {k: v for k, v in data.items() if k != "rules"}
        raw_rules = data.get("rules", [])
        try:
            FilterFile.model_validate({**shell, "rules": []})
            if not isinstance(raw_rules, list):
                raise TypeError
        except ValidationError as exc:
            errors += _pydantic(exc, label, data, lines, ())
            continue
        except TypeError:
            errors.append(f"{_where(label, data, lines, ('rules',))}: expected a list of rules")
            continue
        for i, raw in enumerate(raw_rules):
            loc = ("rules", i)
            try:
                rule = Rule.model_validate(raw)
            except ValidationError as exc:
                errors += _pydantic(exc, label, data, lines, loc)
                continue
            if rule.name in seen:
                errors.append(f"{_where(label, data, lines, loc + ('name',))}: the name is "
                              f"already used in {seen[rule.name]}")
                continue
            seen[rule.name] = label
            if not rule.enabled:
                continue
            groups = Groups()
            parts: list[Any] = []
            try:
                when = (compile_condition(rule.when, loc + ("when",), known, groups, parts)
                        if rule.when is not None else None)
                then = compile_actions(rule.then, loc + ("then",), known, groups)
            except Problem as p:
                key = p.reason in ("unknown condition", "unknown action")
                errors.append(f"{_where(label, data, lines, p.loc, key)}: {p.reason}")
                continue
            guard = anchor_of(rule.when) if rule.when is not None else None
            if guard is not None:
                index.add(guard)
            rules.append(CompiledRule(rule.name, label, when, then, rule.stop, guard, parts))
    if errors:
        raise FilterError(errors)
    matrix = settings.priority.matrix
    index.freeze()
    return Pipeline(rules, files, priority_of=lambda u, i: matrix[u][i], index=index)


def check_plugins(registry: Registry) -> list[str]:
    return [f"plugin {name}: {why}" for name, why in registry.broken.items()]
