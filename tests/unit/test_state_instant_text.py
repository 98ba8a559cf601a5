"""The ledger writes a count's effective time as datetime.isoformat() would, whichever path formats it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from adapter import extract
from adapter.state import _instant_text

_zones = st.none() | st.just(timezone.utc) | st.builds(
    timezone, st.timedeltas(min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23, minutes=59)))
_moments = st.datetimes(timezones=_zones)


@given(_moments | _moments.map(lambda moment: moment.replace(microsecond=0)))
def test_instant_text_is_isoformat(moment):
    assert _instant_text(moment) == moment.isoformat()


@given(st.sampled_from(["2026-11-20T08:00:00Z", "2026-11-20T08:00:00+00:00", "2026-11-20T08:00:00-00:00",
                        "2026-11-20T08:00:00.5Z", "0999-01-01T00:00:00Z", "2026-11-20T08:00:00+01:00",
                        "2026-11-20", "9999-12-31T23:59:59Z"]))
def test_instant_text_of_what_extraction_reads(text):
    moment = extract.parse_datetime(text)
    assert _instant_text(moment) == moment.isoformat()
