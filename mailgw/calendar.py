"""Business calendars: a time zone, working hours per weekday and holidays.

Used by filter rules ("during working hours", "on a weekday"), by auto-assignment (is an
agent at work now?) and by SLA clocks (working-time arithmetic, mailgw/sla). It has no
dependency on the rest of mailgw beyond pydantic and icalendar.

Holidays are fixed dates (``2026-12-24``), yearly dates (``"12-25"``) and the all-day events
of an iCalendar file (``holidays_ics``); ``Calendar.is_holiday_date`` is the one check.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

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
    # Fixed dates (2026-12-24) and yearly dates ("12-25", every year).
    holidays: list[date | str] = []
    # An iCalendar file (relative: to the gateway home): its all-day events are holidays.
    holidays_ics: str | None = None
    _ics_dates: frozenset[date] = PrivateAttr(default=frozenset())

    @field_validator("holidays")
    @classmethod
    def _holidays(cls, v: list[date | str]) -> list[date | str]:
        out: list[date | str] = []
        for h in v:
            if isinstance(h, str) and _YEARLY.fullmatch(h.strip()):
                h = h.strip()
                try:  # 02-29 is a valid yearly date: checked against a leap year
                    date(2000, int(h[:2]), int(h[3:]))
                except ValueError:
                    raise ValueError(f"holiday {h!r}: no such month and day") from None
            elif isinstance(h, str):
                try:
                    h = date.fromisoformat(h.strip())
                except ValueError:
                    raise ValueError(f"holiday {h!r}: expected YYYY-MM-DD, or MM-DD for a "
                                     "yearly date") from None
            out.append(h)
        return out

    @model_validator(mode="after")
    def _load_ics(self, info: ValidationInfo) -> WorkingHours:
        if self.holidays_ics is not None:
            home = (info.context or {}).get("home") if info is not None else None
            path = Path(self.holidays_ics)
            if not path.is_absolute():
                path = Path(home or ".") / path
            self._ics_dates = load_ics_holidays(path)
        return self

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


_YEARLY = re.compile(r"[0-9]{2}-[0-9]{2}")
# The years an iCalendar file's recurring holidays are expanded over.
ICS_YEARS = (2000, 2100)


def load_ics_holidays(path: Path) -> frozenset[date]:
    """The dates of the all-day events in an iCalendar file, recurrences (RRULE, RDATE,
    EXDATE) expanded over ``ICS_YEARS``. A multi-day event makes each of its days a holiday;
    events with a time of day are not holidays and are skipped. Raises ValueError naming the
    file and the reason."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise ValueError(f"holidays_ics {path}: cannot read: {exc.strerror}") from None
    return _load_ics(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _load_ics(path: Path, mtime_ns: int, size: int) -> frozenset[date]:
    import icalendar
    import recurring_ical_events

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"holidays_ics {path}: cannot read: {exc.strerror}") from None
    try:
        cal = icalendar.Calendar.from_ical(data)
        events = recurring_ical_events.of(cal).between(date(ICS_YEARS[0], 1, 1),
                                                       date(ICS_YEARS[1], 1, 1))
    except Exception as exc:  # noqa: BLE001 - icalendar raises several kinds for bad input
        raise ValueError(f"holidays_ics {path}: not a valid iCalendar file: {exc}") from None
    days: set[date] = set()
    for ev in events:
        start = ev.get("DTSTART")
        if start is None or isinstance(start.dt, datetime):
            continue
        first: date = start.dt
        end = ev.get("DTEND")
        last = end.dt if end is not None and not isinstance(end.dt, datetime) else None
        # DTEND of an all-day event is exclusive; without one the event is one day.
        n = max(1, (last - first).days) if last is not None else 1
        days.update(first + timedelta(days=i) for i in range(n))
    return frozenset(days)


class CalendarConfig(WorkingHours):
    """A named calendar in ``config/mailgw.yaml`` (``calendars:``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")


# How far ahead the arithmetic looks for working time before it gives up (a calendar with
# no working hours at all, or years of holidays).
_HORIZON_DAYS = 3 * 366
_DAY_CACHE = 1024


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
        self.name = getattr(hours, "name", None)
        self.holidays = frozenset(h for h in hours.holidays if isinstance(h, date)) | (
            hours._ics_dates)
        self.yearly = frozenset((int(h[:2]), int(h[3:])) for h in hours.holidays
                                if isinstance(h, str))
        self.always = all(spans == ((time(0), time.max),) for spans in self.spans) and not (
            self.holidays or self.yearly)
        # day_spans per date: the arithmetic asks for the same few days again and again.
        self._day_cache: OrderedDict[date, list[tuple[datetime, datetime]]] = OrderedDict()

    def is_holiday_date(self, day: date) -> bool:
        """The one holiday check: a fixed date, a yearly date or a day of the .ics file."""
        return day in self.holidays or (day.month, day.day) in self.yearly

    def day_spans(self, day: date) -> list[tuple[datetime, datetime]]:
        """The working spans of one local date as UTC instants (empty on a holiday).
        Cached per date (a small LRU): the result is a shared list, do not change it."""
        cache = self._day_cache
        hit = cache.get(day)
        if hit is not None:
            try:
                cache.move_to_end(day)
            except KeyError:  # another thread evicted it meanwhile
                pass
            return hit
        spans = self._day_spans(day)
        cache[day] = spans
        while len(cache) > _DAY_CACHE:
            try:
                cache.popitem(last=False)
            except KeyError:
                break
        return spans

    def _day_spans(self, day: date) -> list[tuple[datetime, datetime]]:
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
