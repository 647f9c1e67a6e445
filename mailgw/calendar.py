"""Business calendars: a time zone, working hours per weekday and holidays.

Used by filter rules ("during working hours", "on a weekday") and by auto-assignment (is an
agent at work now?). The SLA work will extend this module; it stays small and has no
dependency on the rest of mailgw beyond pydantic.
"""

from __future__ import annotations

from datetime import date, datetime, time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def parse_span(text: str) -> tuple[time, time]:
    """``"09:00-17:30"`` -> (09:00, 17:30). The end may be ``24:00`` (end of the day)."""
    start, sep, end = text.partition("-")
    if not sep:
        raise ValueError(f"expected HH:MM-HH:MM, got {text!r}")
    try:
        t0 = time.fromisoformat(start.strip())
        t1 = time.max if end.strip() == "24:00" else time.fromisoformat(end.strip())
    except ValueError:
        raise ValueError(f"expected HH:MM-HH:MM, got {text!r}") from None
    if t1 <= t0:
        raise ValueError(f"the span {text!r} ends before it starts")
    return t0, t1


def check_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None
    return name


class WorkingHours(BaseModel):
    """Working hours: per weekday a list of ``HH:MM-HH:MM`` spans, in ``timezone``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    timezone: str = "UTC"
    mon: list[str] = []
    tue: list[str] = []
    wed: list[str] = []
    thu: list[str] = []
    fri: list[str] = []
    sat: list[str] = []
    sun: list[str] = []
    holidays: list[date] = []

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        return check_timezone(v)

    @field_validator(*WEEKDAYS)
    @classmethod
    def _spans(cls, v: list[str]) -> list[str]:
        for span in v:
            parse_span(span)
        return v


class CalendarConfig(WorkingHours):
    """A named calendar in ``config/mailgw.yaml`` (``calendars:``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")


class Calendar:
    """A compiled calendar: answers "is this moment inside working time?"."""

    def __init__(self, hours: WorkingHours):
        self.zone = ZoneInfo(hours.timezone)
        self.spans = [tuple(parse_span(s) for s in getattr(hours, d)) for d in WEEKDAYS]
        self.holidays = frozenset(hours.holidays)

    def local(self, moment: datetime) -> datetime:
        return moment.astimezone(self.zone)

    def is_holiday(self, moment: datetime) -> bool:
        return self.local(moment).date() in self.holidays

    def is_working_time(self, moment: datetime) -> bool:
        t = self.local(moment)
        if t.date() in self.holidays:
            return False
        now = t.time().replace(tzinfo=None)
        return any(a <= now < b or (b == time.max and now >= a) for a, b in self.spans[t.weekday()])


ALWAYS = Calendar(WorkingHours(**{d: ["00:00-24:00"] for d in WEEKDAYS}))
