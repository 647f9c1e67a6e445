"""The filter file format, as pydantic models: validation at load and the JSON Schema.

A file in ``filters/`` holds ``rules:``, a list of rules run in order. Each rule has a
``name``, ``when`` (conditions), ``then`` (actions) and optional ``stop``. The models only
check shape; the loader (``loader.py``) checks what needs the settings (queues, agents,
templates) and compiles regexes once.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from mailgw.calendar import WEEKDAYS, parse_span

TICKET_TYPES = ("incident", "service_request", "problem", "change")
STATES = ("new", "open", "pending", "closed")
Level = Literal["high", "medium", "low"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Match(_Strict):
    """How a text value is tested. Give one of regex / contains / equals / one_of / exists.

    contains, equals and one_of ignore case unless ``case_sensitive: true``; a regex is
    matched as written (use ``(?i)`` to ignore case) and its groups can be used in values as
    ``{match.1}`` or ``{match.NAME}``.
    """

    regex: str | None = None
    contains: str | None = None
    equals: str | None = None
    one_of: list[str] | None = None
    exists: bool | None = None
    case_sensitive: bool = False

    @model_validator(mode="after")
    def _one(self) -> Match:
        given = [k for k in ("regex", "contains", "equals", "one_of", "exists")
                 if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of regex, contains, equals, one_of, exists"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self


def _shorthand(v: Any) -> Any:
    return {"contains": v} if isinstance(v, str) else v


def _listed(v: Any) -> Any:
    return [v] if isinstance(v, dict) else v


# Placeholders: pydantic cannot refer to a definition it does not generate itself, so
# json_schema() swaps these for the real references.
_MATCH_SCHEMA = {"x-mailgw": "match"}
# A plain string is shorthand for ``{contains: STRING}``.
MatchSpec = Annotated[Match, BeforeValidator(_shorthand), WithJsonSchema(_MATCH_SCHEMA)]


class HeaderMatch(Match):
    name: str = Field(min_length=1, description="the header name, any case")


class AttachmentMatch(_Strict):
    """True when one attachment satisfies everything given."""

    name: MatchSpec | None = None
    type: MatchSpec | None = Field(default=None, description="content type, e.g. application/pdf")
    min_size: int | None = Field(default=None, ge=0, description="bytes")
    max_size: int | None = Field(default=None, ge=0, description="bytes")


class SpamMatch(_Strict):
    """``flag``: X-Spam-Flag is YES (or X-Spam-Status starts with Yes); ``score_above``:
    X-Spam-Score (or score= in X-Spam-Status) is greater than N."""

    flag: bool | None = None
    score_above: float | None = None

    @model_validator(mode="after")
    def _some(self) -> SpamMatch:
        if self.flag is None and self.score_above is None:
            raise ValueError("give flag or score_above")
        return self


class TimeMatch(_Strict):
    """When the message is processed, in a calendar's time zone (default UTC)."""

    calendar: str | None = None
    weekdays: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] | None = None
    between: str | None = Field(default=None, description="HH:MM-HH:MM local time")
    working_hours: bool | None = Field(default=None, description="inside the calendar's hours")
    holiday: bool | None = None

    @field_validator("between")
    @classmethod
    def _span(cls, v: str | None) -> str | None:
        if v is not None:
            parse_span(v)
        return v

    @model_validator(mode="after")
    def _some(self) -> TimeMatch:
        if all(getattr(self, k) is None for k in ("weekdays", "between", "working_hours",
                                                   "holiday")):
            raise ValueError("give weekdays, between, working_hours or holiday")
        if (self.working_hours is not None or self.holiday is not None) and not self.calendar:
            raise ValueError("working_hours and holiday need a calendar")
        return self


class Condition(_Strict):
    """Every key given must hold (an implicit ``all``). Plugin conditions are extra keys."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    all_: list[Condition] | None = Field(default=None, alias="all")
    any_: list[Condition] | None = Field(default=None, alias="any")
    not_: Condition | None = Field(default=None, alias="not")
    header: Annotated[list[HeaderMatch], BeforeValidator(_listed), WithJsonSchema({"x-mailgw": "headers"})] | None = None
    sender: MatchSpec | None = Field(default=None, description="From: address (else envelope)")
    sender_domain: MatchSpec | None = None
    recipient: MatchSpec | None = Field(default=None, description="any of To, Cc, envelope")
    subject: MatchSpec | None = None
    body: MatchSpec | None = None
    attachment: AttachmentMatch | None = None
    spam: SpamMatch | None = None
    time: TimeMatch | None = None
    follow_up: bool | None = Field(default=None, description="threads into an existing ticket")
    ticket_state: list[Literal["new", "open", "pending", "closed"]] | None = None
    ticket_queue: list[str] | None = None
    queue: list[str] | None = Field(default=None, description="the queue chosen so far")

    @model_validator(mode="after")
    def _not_empty(self) -> Condition:
        if not self.model_fields_set and not self.model_extra:
            raise ValueError("an empty condition; leave `when` out to match every message")
        return self


class AutoResponse(_Strict):
    template: str


class Actions(_Strict):
    """What a matching rule sets. String values may use ``{match.N}`` / ``{match.NAME}``."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    queue: str | None = None
    priority: int | None = Field(default=None, ge=1, le=5, description="1 highest .. 5 lowest")
    urgency: Level | None = None
    impact: Level | None = None
    type: Literal["incident", "service_request", "problem", "change"] | None = None
    service: str | None = None
    category: str | None = None
    tags: list[str] | None = Field(default=None, description="added to the ticket's tags")
    remove_tags: list[str] | None = None
    fields: dict[str, str | int | float | bool] | None = Field(
        default=None, description="custom fields")
    customer: str | None = None
    company: str | None = None
    owner: str | None = Field(default=None, description="an agent name")
    sla: str | None = Field(default=None, description="an SLA name from slas: (wins over "
                            "applies_to)")
    state: Literal["new", "open", "pending", "closed"] | None = None
    ignore: bool | None = Field(default=None, description="store the mail, make no ticket")
    reject: bool | None = Field(default=None, description="store the mail, no ticket, no reply")
    auto_response: bool | AutoResponse | None = Field(
        default=None, description="false: send none; {template: NAME}: send that template")

    @field_validator("auto_response")
    @classmethod
    def _no_true(cls, v: bool | AutoResponse | None) -> bool | AutoResponse | None:
        if v is True:
            raise ValueError("use false to suppress, or {template: NAME} to choose one")
        return v


class Rule(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    enabled: bool = True
    when: Condition | None = None
    then: Actions = Actions()
    stop: bool = False


class FilterFile(_Strict):
    """One file of ``filters/``; files run in file-name order, rules in file order."""

    description: str | None = None
    rules: list[Rule] = []


def json_schema(conditions: dict[str, Any] | None = None,
                actions: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON Schema of a filter file; plugin conditions/actions become known keys."""
    schema = FilterFile.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "mailgw filter pipeline"
    defs = schema.setdefault("$defs", {})
    defs["Match"] = Match.model_json_schema(ref_template="#/$defs/{model}")
    defs["HeaderMatch"] = HeaderMatch.model_json_schema(ref_template="#/$defs/{model}")
    ref = "#/$defs/{}".format
    swap = {
        "match": {"anyOf": [{"type": "string", "description": "contains, ignoring case"},
                            {"$ref": ref("Match")}]},
        "headers": {"anyOf": [{"$ref": ref("HeaderMatch")},
                              {"type": "array", "items": {"$ref": ref("HeaderMatch")}}]},
    }

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            if "x-mailgw" in node:
                return {**swap[node["x-mailgw"]],
                        **{k: v for k, v in node.items() if k != "x-mailgw"}}
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        return node

    schema = fill(schema)
    defs = schema["$defs"]
    for name, extra in (("Condition", conditions or {}), ("Actions", actions or {})):
        d = defs[name]
        d["additionalProperties"] = False
        for key, sub in extra.items():
            d["properties"][key] = sub
    return schema


__all__ = ["Actions", "Condition", "FilterFile", "Match", "Rule", "STATES", "TICKET_TYPES",
           "WEEKDAYS", "json_schema"]
