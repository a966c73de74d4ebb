"""Time as the Kubernetes API writes it: RFC 3339 in UTC, second resolution."""

from __future__ import annotations

import datetime as dt


def utc_now() -> dt.datetime:
    """The one clock read of a pass (observe stamps it on what it saw; decide never reads a clock)."""
    return dt.datetime.now(dt.UTC)


def rfc3339(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str | None) -> dt.datetime | None:
    """RFC 3339 in any of the forms Kubernetes components write (Z or +00:00, fractions);
    None for absent or unreadable values, which must never stop a reconcile."""
    if not s:
        return None
    try:
        t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)
