"""Warm windows: hours of the week when the GPU server is kept up without waiting for demand.

`PROXY_WARM_WINDOWS` lists them, comma-separated, in `PROXY_TIMEZONE` (default: the host's
local time): `mon-fri 08:00-18:00, sat 10:00-12:00`; a window without days is every day.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta, tzinfo

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class ScheduleError(ValueError):
    """A window that cannot be read; the message says what is accepted."""


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # 0 = Monday
    start: int  # minutes after midnight
    end: int  # minutes after midnight, > start; 1440 is midnight at the end of the day

    def __str__(self) -> str:
        days = ",".join(DAYS[d] for d in sorted(self.days))
        return f"{days} {_clock(self.start)}-{_clock(self.end)}"


def parse_windows(text: str) -> tuple[Window, ...]:
    return tuple(_parse_window(part) for part in text.split(",") if part.strip())


def _parse_window(part: str) -> Window:
    words = part.split()
    if len(words) not in (1, 2):
        raise ScheduleError(f"{part.strip()!r} is not a window; use e.g. mon-fri 08:00-18:00")
    days = _days(words[0]) if len(words) == 2 else frozenset(range(7))
    start_text, sep, end_text = words[-1].partition("-")
    if not sep:
        raise ScheduleError(f"{part.strip()!r} has no end; use HH:MM-HH:MM, e.g. 08:00-18:00")
    start, end = _minutes(start_text), _minutes(end_text)
    if end <= start:
        raise ScheduleError(
            f"{part.strip()!r}: the end must be after the start, on the same day (HH:MM-HH:MM, "
            "up to 24:00; split a window over midnight in two)"
        )
    return Window(days, start, end)


def _days(text: str) -> frozenset[int]:
    first, sep, last = text.lower().partition("-")
    if first not in DAYS or (sep and last not in DAYS):
        raise ScheduleError(f"{text!r} is not a day or a range of days; use e.g. mon-fri or sat")
    a, b = DAYS.index(first), DAYS.index(last) if sep else DAYS.index(first)
    return frozenset((a + i) % 7 for i in range((b - a) % 7 + 1))  # fri-mon wraps


def _minutes(text: str) -> int:
    hours, sep, minutes = text.partition(":")
    if not (sep and hours.isdigit() and minutes.isdigit() and len(minutes) == 2):
        raise ScheduleError(f"{text!r} is not a time; use HH:MM, e.g. 08:00")
    value = int(hours) * 60 + int(minutes)
    if int(minutes) > 59 or value > 24 * 60:
        raise ScheduleError(f"{text!r} is not a time of day (00:00 to 24:00)")
    return value


def _clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def is_warm(windows: tuple[Window, ...], when: datetime) -> bool:
    """Is `when` (aware, in the schedule's zone) inside a window?"""
    return current_end(windows, when) is not None


def current_end(windows: tuple[Window, ...], when: datetime) -> datetime | None:
    """The end of the window `when` is in (the latest, if several overlap); None outside."""
    minute = when.hour * 60 + when.minute
    ends = [w.end for w in windows if when.weekday() in w.days and w.start <= minute < w.end]
    midnight = datetime.combine(when.date(), time(), when.tzinfo)
    return midnight + timedelta(minutes=max(ends)) if ends else None


def last_end(windows: tuple[Window, ...], when: datetime) -> datetime | None:
    """The latest end of a window at or before `when`, within the past week."""
    ends = [
        end
        for back in range(8)
        for end in _ends_on(windows, when.date() - timedelta(days=back), when.tzinfo)
        if end <= when
    ]
    return max(ends, default=None)


def next_start(windows: tuple[Window, ...], when: datetime) -> datetime | None:
    """The earliest start of a window after `when`, within the coming week."""
    starts = [
        datetime.combine(when.date() + timedelta(days=ahead), time(), when.tzinfo)
        + timedelta(minutes=w.start)
        for ahead in range(8)
        for w in windows
        if (when.date() + timedelta(days=ahead)).weekday() in w.days
    ]
    return min((s for s in starts if s > when), default=None)


def _ends_on(windows: tuple[Window, ...], day, zone: tzinfo | None) -> list[datetime]:
    midnight = datetime.combine(day, time(), zone)
    return [midnight + timedelta(minutes=w.end) for w in windows if day.weekday() in w.days]
