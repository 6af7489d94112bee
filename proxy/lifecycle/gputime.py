"""GPU time: how long GPU servers have existed, per server, per day and in all.

The lifecycle document keeps `instance_since` (when the current server was asked for: billing
may start with the request) and, for servers already gone, seconds per day (`gpu_days`, in the
schedule's zone, the last DAYS_KEPT days) and in all (`gpu_seconds`). The fleet's other
servers add their own `instance_since` (`fleet_since` here): the daily budget and the totals
count every server, the instance-hour limit each. Pure functions of the document: every worker
computes the same figures from the same snapshot.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta, tzinfo
from typing import Any

DAYS_KEPT = 31


def close_interval(doc: dict[str, Any], end: float, zone: tzinfo,
                   start: float | None = None) -> dict[str, Any]:
    """The document's changes once the current server (or the fleet server asked for at
    `start`) is gone at `end`: its time is booked."""
    primary = start is None
    start = (doc.get("instance_since") or 0.0) if primary else start
    if not start or end <= start:
        return {"instance_since": 0.0} if primary else {}
    days = dict(doc.get("gpu_days") or {})
    for day, seconds in _split_by_day(start, end, zone):
        days[day] = round(days.get(day, 0.0) + seconds, 3)
    kept = dict(sorted(days.items())[-DAYS_KEPT:])
    total = round((doc.get("gpu_seconds") or 0.0) + end - start, 3)
    return {**({"instance_since": 0.0} if primary else {}), "gpu_days": kept,
            "gpu_seconds": total}


def instance_seconds(doc: dict[str, Any], now: float) -> float:
    """How long the current server has existed (0 when there is none)."""
    start = doc.get("instance_since") or 0.0
    return max(0.0, now - start) if start else 0.0


def today_seconds(doc: dict[str, Any], now: float, zone: tzinfo) -> float:
    """GPU seconds used today (in `zone`): servers gone today plus the current one's share."""
    today = _day(now, zone)
    used = (doc.get("gpu_days") or {}).get(today, 0.0)
    for start in _running_since(doc):
        if now > start:
            used += sum(s for day, s in _split_by_day(start, now, zone) if day == today)
    return used


def over_budget(doc: dict[str, Any], now: float, zone: tzinfo, daily_hours: float) -> bool:
    """Has today's GPU time reached the daily budget (0: none)?"""
    return bool(daily_hours) and today_seconds(doc, now, zone) >= daily_hours * 3600


def total_seconds(doc: dict[str, Any], now: float) -> float:
    return (doc.get("gpu_seconds") or 0.0) + sum(max(0.0, now - s) for s in _running_since(doc))


def _running_since(doc: dict[str, Any]) -> list[float]:
    """When each server running now was asked for: the primary, then the fleet's others."""
    return [s for s in (doc.get("instance_since") or 0.0, *(doc.get("fleet_since") or ())) if s]


def next_midnight(now: float, zone: tzinfo) -> float:
    """The unix time at which the day of `now` (in `zone`) ends."""
    local = datetime.fromtimestamp(now, zone)
    return datetime.combine(local.date() + timedelta(days=1), time(), zone).timestamp()


def _day(timestamp: float, zone: tzinfo) -> str:
    return datetime.fromtimestamp(timestamp, zone).date().isoformat()


def _split_by_day(start: float, end: float, zone: tzinfo) -> list[tuple[str, float]]:
    """[(YYYY-MM-DD, seconds)] of the interval start..end, cut at each midnight in `zone`."""
    parts = []
    while start < end:
        cut = min(end, next_midnight(start, zone))
        parts.append((_day(start, zone), cut - start))
        start = cut
    return parts
