"""Warm windows: parsing, and where a moment falls, across days and time zones."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from proxy.lifecycle.schedule import (
    ScheduleError,
    current_end,
    is_warm,
    last_end,
    next_start,
    parse_windows,
)

VIENNA = ZoneInfo("Europe/Vienna")
WEEKDAYS = parse_windows("mon-fri 08:00-18:00, sat 10:00-12:00")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=VIENNA)


def test_windows_read_days_ranges_and_times():
    assert [str(w) for w in WEEKDAYS] == ["mon,tue,wed,thu,fri 08:00-18:00", "sat 10:00-12:00"]
    assert str(parse_windows("09:00-24:00")[0]) == "mon,tue,wed,thu,fri,sat,sun 09:00-24:00"
    assert str(parse_windows("fri-mon 07:30-09:00")[0]) == "mon,fri,sat,sun 07:30-09:00"
    assert parse_windows("") == ()


@pytest.mark.parametrize("text, says", [
    ("mon-fri 18:00-08:00", "the end must be after the start"),
    ("someday 08:00-09:00", "not a day"),
    ("mon 08:00", "has no end"),
    ("mon 8-9", "not a time"),
    ("mon 08:00-25:00", "not a time of day"),
    ("mon fri 08:00-09:00", "not a window"),
])
def test_a_bad_window_says_what_is_accepted(text, says):
    with pytest.raises(ScheduleError, match=says):
        parse_windows(text)


def test_a_moment_inside_a_window_is_warm_and_the_end_is_exclusive():
    assert is_warm(WEEKDAYS, at("2026-12-01T08:00"))  # a Tuesday
    assert is_warm(WEEKDAYS, at("2026-12-01T17:59"))
    assert not is_warm(WEEKDAYS, at("2026-12-01T18:00"))
    assert not is_warm(WEEKDAYS, at("2026-12-06T11:00"))  # a Sunday
    assert is_warm(WEEKDAYS, at("2026-12-05T11:00"))  # a Saturday
    assert current_end(WEEKDAYS, at("2026-12-01T09:00")) == at("2026-12-01T18:00")
    assert current_end(WEEKDAYS, at("2026-12-01T19:00")) is None


def test_last_end_and_next_start_look_across_days():
    assert last_end(WEEKDAYS, at("2026-12-01T09:00")) == at("2026-11-30T18:00")
    assert last_end(WEEKDAYS, at("2026-12-01T18:30")) == at("2026-12-01T18:00")
    assert last_end(WEEKDAYS, at("2026-12-07T07:00")) == at("2026-12-05T12:00")  # Monday
    assert next_start(WEEKDAYS, at("2026-12-04T19:00")) == at("2026-12-05T10:00")  # Friday
    assert next_start(WEEKDAYS, at("2026-12-05T13:00")) == at("2026-12-07T08:00")
    assert next_start((), at("2026-12-05T13:00")) is None


def test_windows_are_wall_clock_times_across_a_daylight_saving_change():
    # Vienna moved from UTC+2 to UTC+1 in the night of 2026-10-25 (a Sunday).
    monday = at("2026-10-26T08:30")
    assert is_warm(WEEKDAYS, monday) and monday.utcoffset().total_seconds() == 3600
    assert last_end(WEEKDAYS, monday).utcoffset().total_seconds() == 7200  # Saturday, summer
