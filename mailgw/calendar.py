"""Business calendars: a time zone, working hours per weekday and holidays.

Used by filter rules ("during working hours", "on a weekday") and by auto-assignment (is an
agent at work now?). The SLA work will extend this module; it stays small and has no
dependency on the rest of mailgw beyond pydantic.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
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


# How far ahead the arithmetic looks for working time before it gives up (a calendar with
# no working hours at all, or years of holidays).
_HORIZON_DAYS = 3 * 366


class Calendar:
    """A compiled calendar: is a moment inside working time, and working-time arithmetic
    (``add``, ``working_seconds``, ``next_working``) for SLA clocks.

    Arithmetic walks the local days and their spans; each span is turned into real (UTC)
    instants through the zone, so a working day that crosses a DST change counts the hours
    that really pass. All arguments and results are aware datetimes; results are in UTC.
    """

    def __init__(self, hours: WorkingHours):
        self.zone = ZoneInfo(hours.timezone)
        self.spans = [tuple(parse_span(s) for s in getattr(hours, d)) for d in WEEKDAYS]
        self.holidays = frozenset(hours.holidays)
        self.always = all(spans == ((time(0), time.max),) for spans in self.spans) and not (
            self.holidays)

    def is_holiday_date(self, day: date) -> bool:
        return day in self.holidays

    def day_spans(self, day: date) -> list[tuple[datetime, datetime]]:
        """The working spans of one local date as UTC instants (empty on a holiday)."""
        if self.is_holiday_date(day):
            return []
        out = []
        for a, b in self.spans[day.weekday()]:
            start = datetime.combine(day, a, self.zone)
            end = (datetime.combine(day + timedelta(days=1), time(0), self.zone)
                   if b == time.max else datetime.combine(day, b, self.zone))
            out.append((start.astimezone(UTC), end.astimezone(UTC)))
        return out

    def _days_from(self, moment: datetime):  # type: ignore[no-untyped-def]
        day = self.local(moment).date()
        for i in range(_HORIZON_DAYS):
            yield day + timedelta(days=i)
        raise ValueError(f"no working time within {_HORIZON_DAYS} days of {moment.isoformat()}")

    def add(self, start: datetime, seconds: float) -> datetime:
        """The instant at which ``seconds`` of working time after ``start`` have passed."""
        if self.always:
            return (start + timedelta(seconds=seconds)).astimezone(UTC)
        remaining = timedelta(seconds=seconds)
        for day in self._days_from(start):
            for a, b in self.day_spans(day):
                s = max(a, start)
                if s >= b:
                    continue
                if remaining <= b - s:
                    return s + remaining
                remaining -= b - s
        raise AssertionError("unreachable")

    def working_seconds(self, start: datetime, end: datetime) -> float:
        """Working time between two instants, in seconds (0 if ``end <= start``)."""
        if end <= start:
            return 0.0
        if self.always:
            return (end - start).total_seconds()
        total = 0.0
        for day in self._days_from(start):
            spans = self.day_spans(day)
            if spans and spans[0][0] >= end:
                break
            for a, b in spans:
                lo, hi = max(a, start), min(b, end)
                if hi > lo:
                    total += (hi - lo).total_seconds()
            if self.local(end).date() < day:
                break
        return total

    def next_working(self, moment: datetime) -> datetime:
        """``moment`` if it is inside working time, else the start of the next working span."""
        if self.always:
            return moment.astimezone(UTC)
        for day in self._days_from(moment):
            for a, b in self.day_spans(day):
                if b > moment:
                    return max(a, moment).astimezone(UTC)
        raise AssertionError("unreachable")

    def local(self, moment: datetime) -> datetime:
        return moment.astimezone(self.zone)

    def is_holiday(self, moment: datetime) -> bool:
        return self.is_holiday_date(self.local(moment).date())

    def is_working_time(self, moment: datetime) -> bool:
        t = self.local(moment)
        if self.is_holiday_date(t.date()):
            return False
        now = t.time().replace(tzinfo=None)
        return any(a <= now < b or (b == time.max and now >= a) for a, b in self.spans[t.weekday()])


ALWAYS = Calendar(WorkingHours(**{d: ["00:00-24:00"] for d in WEEKDAYS}))
