"""GPU time: booked per day at midnight in the configured zone, and the daily budget."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from proxy.lifecycle import gputime

VIENNA = ZoneInfo("Europe/Vienna")


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=VIENNA).timestamp()


def test_a_server_gone_after_midnight_is_booked_on_both_days():
    doc = {"instance_since": ts("2026-12-01T23:00"), "gpu_seconds": 100.0}
    booked = gputime.close_interval(doc, ts("2026-12-02T01:30"), VIENNA)
    assert booked["gpu_days"] == {"2026-12-01": 3600.0, "2026-12-02": 5400.0}
    assert booked["gpu_seconds"] == 100.0 + 9000.0
    assert booked["instance_since"] == 0.0


def test_today_counts_servers_gone_today_and_the_current_one_since_midnight():
    now = ts("2026-12-02T02:00")
    doc = {"gpu_days": {"2026-12-02": 600.0, "2026-12-01": 7200.0},
           "instance_since": ts("2026-12-01T23:00")}
    assert gputime.today_seconds(doc, now, VIENNA) == 600.0 + 7200.0
    assert gputime.instance_seconds(doc, now) == 3 * 3600.0
    assert gputime.total_seconds({"gpu_seconds": 50.0}, now) == 50.0


def test_the_budget_is_used_up_when_today_reaches_it():
    now = ts("2026-12-02T12:00")
    doc = {"gpu_days": {"2026-12-02": 3 * 3600.0}, "instance_since": now - 3600}
    assert not gputime.over_budget(doc, now, VIENNA, 0)  # no budget
    assert not gputime.over_budget(doc, now, VIENNA, 4.5)
    assert gputime.over_budget(doc, now, VIENNA, 4)
    assert gputime.next_midnight(now, VIENNA) == ts("2026-12-03T00:00")


def test_only_the_last_month_of_days_is_kept():
    days = {f"2026-10-{d:02d}": 1.0 for d in range(1, 32)}
    doc = {"instance_since": ts("2026-11-01T10:00"), "gpu_days": days}
    booked = gputime.close_interval(doc, ts("2026-11-01T10:01"), VIENNA)
    assert len(booked["gpu_days"]) == gputime.DAYS_KEPT
    assert "2026-10-01" not in booked["gpu_days"] and booked["gpu_days"]["2026-11-01"] == 60.0


def test_nothing_is_booked_without_a_server():
    assert gputime.close_interval({}, ts("2026-12-02T12:00"), VIENNA) == {"instance_since": 0.0}


def test_the_daily_budget_counts_every_server_of_a_fleet():
    from datetime import timezone

    now = 1_780_000_000.0
    one = {"instance_since": now - 1800, "gpu_days": {}, "gpu_seconds": 0.0}
    three = {**one, "fleet_since": [now - 1800, now - 1800]}
    assert gputime.today_seconds(three, now, timezone.utc) == pytest.approx(5400)
    assert not gputime.over_budget(one, now, timezone.utc, daily_hours=1)
    assert gputime.over_budget(three, now, timezone.utc, daily_hours=1)
    assert gputime.instance_seconds(three, now) == pytest.approx(1800)  # the limit is each's
    assert gputime.total_seconds(three, now) == pytest.approx(5400)
    booked = gputime.close_interval(three, now, timezone.utc, start=now - 1800)
    assert booked["gpu_seconds"] == pytest.approx(1800) and "instance_since" not in booked
