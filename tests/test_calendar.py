"""Business-calendar arithmetic (mailgw/calendar.py): working time through DST changes,
weekends, holidays (fixed, yearly, .ics), split days, 24:00 ends, arrival outside hours and
multi-week goals. Expected instants are worked out by hand in the comments."""

from __future__ import annotations

import random
import shutil
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from mailgw.calendar import ALWAYS, Calendar, CalendarConfig, WorkingHours, load_ics_holidays
from mailgw.settings import ConfigError, Home, load_settings

DATA = Path(__file__).parent / "data"
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
WEEK = ("mon", "tue", "wed", "thu", "fri")


def cal(tz: str = "Europe/Berlin", days: tuple[str, ...] = WEEK,
        spans: tuple[str, ...] = ("09:00-17:00",), **extra) -> Calendar:  # type: ignore[no-untyped-def]
    return Calendar(CalendarConfig(name="office", timezone=tz,
                                   **{d: list(spans) for d in days}, **extra))


def local(tz: ZoneInfo, *args: int) -> datetime:
    return datetime(*args, tzinfo=tz)


H = 3600


# -- weekends, arrival outside hours --------------------------------------------------

def test_friday_evening_arrival_counts_from_monday_morning():
    c = cal(spans=("09:00-18:00",))
    fri = local(BERLIN, 2026, 11, 27, 17, 55)
    # 5 min on Friday (17:55-18:00), 55 min on Monday (09:00-09:55)
    assert c.add(fri, 60 * 60) == local(BERLIN, 2026, 11, 30, 9, 55)
    assert c.working_seconds(fri, local(BERLIN, 2026, 11, 30, 9, 55)) == 3600
    assert c.next_working(fri) == fri
    after = local(BERLIN, 2026, 11, 27, 18, 30)
    assert c.next_working(after) == local(BERLIN, 2026, 11, 30, 9, 0)
    assert c.add(after, 60) == local(BERLIN, 2026, 11, 30, 9, 1)
    # Saturday to Sunday counts nothing
    assert c.working_seconds(local(BERLIN, 2026, 11, 28, 0, 0),
                             local(BERLIN, 2026, 11, 30, 0, 0)) == 0


def test_results_are_utc_and_inputs_any_zone():
    c = cal()
    start = local(NEW_YORK, 2026, 11, 26, 20, 0)  # = Fri 02:00 Berlin: before hours
    got = c.add(start, 30 * 60)
    assert got.tzinfo == UTC
    assert got == local(BERLIN, 2026, 11, 27, 9, 30)


def test_zero_and_backwards():
    c = cal()
    t = local(BERLIN, 2026, 11, 25, 10, 0)
    assert c.add(t, 0) == t
    assert c.working_seconds(t, t) == 0
    assert c.working_seconds(t, t - timedelta(hours=1)) == 0
    sunday = local(BERLIN, 2026, 11, 29, 12, 0)
    assert c.add(sunday, 0) == local(BERLIN, 2026, 11, 30, 9, 0)  # 0 s: the next working instant


# -- split days and 24:00 ---------------------------------------------------------------

def test_lunch_break_is_not_counted():
    c = cal(spans=("08:00-12:00", "13:00-17:00"))
    t = local(BERLIN, 2026, 11, 25, 11, 30)
    assert c.add(t, 60 * 60) == local(BERLIN, 2026, 11, 25, 13, 30)
    assert c.working_seconds(t, local(BERLIN, 2026, 11, 25, 14, 0)) == 1.5 * H
    assert c.next_working(local(BERLIN, 2026, 11, 25, 12, 15)) == local(BERLIN, 2026, 11, 25, 13)
    # a whole day is 8 h; 9 h from Wed 08:00 ends Thu 09:00
    assert c.add(local(BERLIN, 2026, 11, 25, 8), 9 * H) == local(BERLIN, 2026, 11, 26, 9)


def test_a_span_ending_at_midnight():
    c = cal(days=("sat",), spans=("20:00-24:00",))
    sat = local(BERLIN, 2026, 11, 28, 22, 0)
    # 2 h left of Saturday: the goal ends at midnight exactly
    assert c.add(sat, 2 * H) == local(BERLIN, 2026, 11, 29, 0, 0)
    # one second more: next Saturday 20:00:01
    assert c.add(sat, 2 * H + 1) == local(BERLIN, 2026, 12, 5, 20, 0, 1)
    assert c.working_seconds(local(BERLIN, 2026, 11, 28, 12), local(BERLIN, 2026, 11, 29, 12)) == 4 * H
    assert c.is_working_time(local(BERLIN, 2026, 11, 28, 23, 59, 59))
    assert not c.is_working_time(local(BERLIN, 2026, 11, 29, 0, 0, 1))


# -- DST ----------------------------------------------------------------------------------

def test_berlin_spring_forward_day_is_23_hours():
    c = cal(days=("sun",), spans=("00:00-24:00",))
    day = date(2026, 3, 29)  # 02:00 CET -> 03:00 CEST
    start, end = local(BERLIN, 2026, 3, 29, 0, 0), local(BERLIN, 2026, 3, 30, 0, 0)
    assert c.working_seconds(start, end) == 23 * H
    assert c.day_spans(day) == [(start.astimezone(UTC), end.astimezone(UTC))]
    # 01:00-04:00 local is two real hours that day
    c2 = cal(days=("sun",), spans=("01:00-04:00",))
    assert c2.working_seconds(start, end) == 2 * H
    assert c2.add(start, 90 * 60) == local(BERLIN, 2026, 3, 29, 3, 30)  # 01:00 + 1h30 real


def test_berlin_fall_back_day_is_25_hours():
    c = cal(days=("sun",), spans=("00:00-24:00",))
    start, end = local(BERLIN, 2026, 10, 25, 0, 0), local(BERLIN, 2026, 10, 26, 0, 0)
    assert c.working_seconds(start, end) == 25 * H
    c2 = cal(days=("sun",), spans=("01:00-04:00",))
    assert c2.working_seconds(start, end) == 4 * H
    # 3 real hours after 01:00 CEST is 03:00 CET (the second 02:00-03:00 counts too)
    assert c2.add(start, 3 * H) == datetime(2026, 10, 25, 2, 0, tzinfo=UTC)


def test_office_hours_keep_their_local_time_across_dst():
    c = cal(tz="America/New_York")
    fri = local(NEW_YORK, 2026, 3, 6, 16, 0)  # EST (UTC-5)
    mon = c.add(fri, 2 * H)  # 1 h Friday, 1 h Monday: 10:00 EDT (UTC-4)
    assert mon == local(NEW_YORK, 2026, 3, 9, 10, 0)
    assert mon == datetime(2026, 3, 9, 14, 0, tzinfo=UTC)
    fri = local(NEW_YORK, 2026, 10, 30, 16, 0)  # EDT
    assert c.add(fri, 2 * H) == datetime(2026, 11, 2, 15, 0, tzinfo=UTC)  # Mon 10:00 EST
    # Berlin changes on another weekend: the hours follow Berlin's clock, not New York's
    b = cal()
    assert b.add(local(BERLIN, 2026, 3, 27, 16, 0), 2 * H) == datetime(2026, 3, 30, 8, 0,
                                                                        tzinfo=UTC)


def test_add_and_working_seconds_agree_everywhere():
    """``working_seconds(t, add(t, s)) == s`` for many starts and goals, across DST changes,
    holidays and split days: the two functions must agree on every instant."""
    rng = random.Random(6)
    cals = [
        cal(spans=("08:00-12:00", "13:00-17:00"), holidays=["12-25", date(2026, 10, 26)]),
        cal(tz="America/New_York", days=WEEK + ("sat",), spans=("07:30-19:00",)),
        cal(days=("sun", "mon"), spans=("00:00-03:00", "22:00-24:00")),
    ]
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for c in cals:
        for _ in range(300):
            start = base + timedelta(seconds=rng.randrange(0, 366 * 86400))
            secs = rng.choice([0, 1, 59, 3600, rng.randrange(1, 40 * 3600), 3 * 7 * 8 * 3600])
            end = c.add(start, secs)
            assert end >= start
            assert c.working_seconds(start, end) == pytest.approx(secs, abs=1e-6)
            if secs:  # the goal is used up in working time, never in a gap
                assert c.is_working_time(end - timedelta(microseconds=1))


# -- holidays -------------------------------------------------------------------------------

def test_fixed_and_yearly_holidays():
    c = cal(holidays=[date(2026, 12, 24), "12-25", "12-26", "2026-12-31"])
    assert c.is_holiday_date(date(2026, 12, 24))
    assert not c.is_holiday_date(date(2027, 12, 24))  # fixed: that year only
    assert c.is_holiday_date(date(2031, 12, 25))  # yearly
    assert c.is_holiday_date(date(2026, 12, 31))
    assert c.day_spans(date(2026, 12, 25)) == []
    wed = local(BERLIN, 2026, 12, 23, 16, 0)
    # 1 h Wednesday; Thu 24 and Fri 25 holidays, weekend, Mon 28 09:00 + 1 h
    assert c.add(wed, 2 * H) == local(BERLIN, 2026, 12, 28, 10, 0)
    assert not c.is_working_time(local(BERLIN, 2026, 12, 24, 10))
    assert c.is_holiday(local(BERLIN, 2026, 12, 24, 10))


def test_bad_holidays_are_refused():
    with pytest.raises(ValueError, match="no such month and day"):
        WorkingHours(holidays=["02-30"])
    with pytest.raises(ValueError, match="expected YYYY-MM-DD"):
        WorkingHours(holidays=["Christmas"])
    assert WorkingHours(holidays=["02-29"]).holidays == ["02-29"]


def test_ics_holidays(tmp_path: Path):
    days = load_ics_holidays(DATA / "holidays.ics")
    # yearly RRULE, two days each (DTEND exclusive)
    assert {date(2026, 12, 25), date(2026, 12, 26), date(2040, 12, 26)} <= days
    assert date(2026, 12, 27) not in days
    # a four-day event, and a one-day event without DTEND
    assert {date(2027, 3, 26), date(2027, 3, 27), date(2027, 3, 28), date(2027, 3, 29),
            date(2027, 1, 1)} <= days
    assert date(2027, 3, 30) not in days
    # an event with a time of day is not a holiday
    assert date(2026, 12, 4) not in days
    c = Calendar(WorkingHours(timezone="Europe/Berlin", mon=["09:00-17:00"],
                              holidays_ics=str(DATA / "holidays.ics")))
    assert c.is_holiday_date(date(2027, 3, 29)) and c.day_spans(date(2027, 3, 29)) == []
    assert not c.always


def _home_with(tmp_path: Path, calendars: list[dict]) -> Home:
    from mailgw.home import init_home

    init_home(tmp_path / "home")
    cfg = tmp_path / "home" / "config" / "mailgw.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["calendars"] = calendars
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    return Home(tmp_path / "home")


def test_ics_path_is_relative_to_the_home(tmp_path: Path):
    home = _home_with(tmp_path, [{"name": "office", "timezone": "Europe/Berlin",
                                  "mon": ["09:00-17:00"], "holidays_ics": "config/hol.ics"}])
    shutil.copy(DATA / "holidays.ics", home.path / "config" / "hol.ics")
    settings = load_settings(home)
    c = Calendar(settings.calendars[0])
    assert c.is_holiday_date(date(2030, 12, 25))


def test_a_bad_ics_file_is_a_config_error_naming_the_file(tmp_path: Path):
    home = _home_with(tmp_path, [{"name": "office", "mon": ["09:00-17:00"],
                                  "holidays_ics": "config/missing.ics"}])
    with pytest.raises(ConfigError) as exc:
        load_settings(home)
    msg = str(exc.value)
    assert "mailgw.yaml:" in msg and "calendars" in msg
    assert "config/missing.ics" in msg and "cannot read" in msg
    (home.path / "config" / "missing.ics").write_text("this is not iCalendar\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(home)
    assert "not a valid iCalendar file" in str(exc.value)


# -- long goals, cache, ALWAYS --------------------------------------------------------------

def test_multi_week_goal():
    c = cal()  # 8 h a day, 5 days a week
    mon = local(BERLIN, 2026, 11, 2, 9, 0)
    # 80 h = 10 working days: ends Fri 13 Nov 17:00
    assert c.add(mon, 80 * H) == local(BERLIN, 2026, 11, 13, 17, 0)
    # three weeks spanning the autumn change (25 Oct) and a holiday on Mon 26 Oct
    c2 = cal(holidays=[date(2026, 10, 26)])
    start = local(BERLIN, 2026, 10, 19, 9, 0)
    end = c2.add(start, 14 * 8 * H)  # 14 working days: 19-23, 27-30, 2-6 Nov
    assert end == local(BERLIN, 2026, 11, 6, 17, 0)
    assert c2.working_seconds(start, end) == 14 * 8 * H


def test_day_spans_are_cached_and_bounded():
    c = cal()
    d = date(2026, 11, 25)
    assert c.day_spans(d) is c.day_spans(d)
    for i in range(3000):
        c.day_spans(d + timedelta(days=i))
    assert len(c._day_cache) <= 1024
    # still right after eviction
    assert c.day_spans(d) == [(local(BERLIN, 2026, 11, 25, 9), local(BERLIN, 2026, 11, 25, 17))]


def test_always_is_plain_time():
    t = datetime(2026, 3, 29, 0, 30, tzinfo=UTC)
    assert ALWAYS.add(t, 5 * H) == t + timedelta(hours=5)
    assert ALWAYS.working_seconds(t, t + timedelta(days=3)) == 3 * 86400


def test_no_working_time_at_all_is_an_error_not_a_hang():
    c = Calendar(WorkingHours(timezone="UTC"))
    with pytest.raises(ValueError, match="no working time"):
        c.add(datetime(2026, 1, 1, tzinfo=UTC), 60)
