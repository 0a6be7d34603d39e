"""Room jobs' times: a weekly job keeps its wall-clock time across daylight saving (room jobs
at work: tests/test_room_jobs.py)."""
from __future__ import annotations

from datetime import datetime

import pytest

pytestmark = pytest.mark.fast


def test_weekly_jobs_keep_their_wall_clock_time_across_daylight_saving():
    from labmetal import schedule
    # Monday 2026-10-19 08:00 in Paris is 06:00 UTC (summer time); a week later, 07:00 UTC
    first = schedule.parse_at("2026-10-19T08:00", "Europe/Paris")
    assert first == datetime(2026, 10, 19, 6, 0)
    following = schedule.next_occurrence(first, "weekly", "Europe/Paris",
                                         after=datetime(2026, 10, 20))
    assert following == datetime(2026, 10, 26, 7, 0)
    now = datetime(2026, 11, 25, 9, 30)  # UTC: 10:30 in Paris, so 08:00 is tomorrow's
    assert schedule.parse_at("08:00", "Europe/Paris", now=now) == datetime(2026, 11, 26, 7, 0)
    assert schedule.parse_at("now") is None
    with pytest.raises(ValueError, match="time zone"):
        schedule.zone("Mars/Olympus")

