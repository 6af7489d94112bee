"""A short version of the soak (tests/soak.py; `./dev soak` runs the 10-minute one)."""

from __future__ import annotations

import pytest

from tests import soak

pytestmark = pytest.mark.slow


def test_a_minute_of_mixed_traffic_and_cold_starts_loses_nothing_and_leaks_nothing(tmp_path):
    report = soak.run(45, tmp_path, log=lambda line: None)
    summary = report.text()
    assert report.lost == 0, summary
    assert report.answered == report.tried > 1000, summary
    assert report.cold_starts >= 3, summary  # the first, then one per quiet spell
    assert report.within_bounds(), summary
