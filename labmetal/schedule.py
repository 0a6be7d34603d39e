"""When room jobs run: "now", "08:00" (the next 08:00 in the lab's time zone), an ISO time,
and weekly or daily repeats that keep the wall-clock time across daylight-saving changes.
Times are stored as naive UTC (models.utcnow)."""
from __future__ import annotations

import os
import re
from datetime import datetime, time, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

REPEATS = {"daily": timedelta(days=1), "weekly": timedelta(days=7)}
_CLOCK = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


def zone(name: str = "") -> ZoneInfo:
    """The named zone, else the machine's (TZ, then /etc/localtime), else UTC."""
    name = name or os.environ.get("TZ", "").lstrip(":")
    if not name:
        target = Path("/etc/localtime")
        if target.is_symlink():
            name = str(target.resolve()).partition("zoneinfo/")[2]
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (use a name such as Europe/Paris)") \
            from None


def to_utc(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


def parse_at(value: object, zone_name: str = "", now: datetime | None = None) -> datetime | None:
    """None for "now"; otherwise the naive-UTC moment. A time without an offset is the lab's
    local time; "HH:MM" is its next occurrence."""
    if value in (None, "", "now"):
        return None
    if not isinstance(value, str):
        raise ValueError(f"Invalid at {value!r}: expected \"HH:MM\" or an ISO 8601 time")
    tz = zone(zone_name)
    local_now = (now.replace(tzinfo=timezone.utc) if now else datetime.now(timezone.utc)) \
        .astimezone(tz)
    clock = _CLOCK.match(value.strip())
    if clock:
        wanted = time(int(clock[1]), int(clock[2]))
        moment = datetime.combine(local_now.date(), wanted, tz)
        if moment <= local_now:
            moment = datetime.combine(local_now.date() + timedelta(days=1), wanted, tz)
        return to_utc(moment)
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"Invalid at {value!r}: expected \"HH:MM\" or an ISO 8601 time such "
                         "as 2026-12-07T08:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    return to_utc(moment)


def check_repeat(value: object) -> str | None:
    if value in (None, "", "none"):
        return None
    if value not in REPEATS:
        raise ValueError(f"Invalid repeat {value!r}; expected one of {', '.join(REPEATS)}")
    return str(value)


def next_occurrence(scheduled_utc: datetime, repeat: str, zone_name: str = "",
                    after: datetime | None = None) -> datetime:
    """The first repeat of ``scheduled_utc`` after ``after`` (default: now), at the same
    local wall-clock time."""
    tz = zone(zone_name)
    after = after or datetime.now(timezone.utc).replace(tzinfo=None)
    local = scheduled_utc.replace(tzinfo=timezone.utc).astimezone(tz).replace(tzinfo=None)
    while True:
        local += REPEATS[repeat]
        moment = to_utc(local.replace(tzinfo=tz))
        if moment > after:
            return moment
