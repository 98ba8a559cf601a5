"""adapter.fhir.throttle: the token bucket behind [fhir] max_requests_per_s, on a fake clock. The HTTP side
(every request of a run, prefetch and retries included) is in tests/integration/test_rate_limit.py."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapter.config import load
from adapter.errors import ConfigError
from adapter.fhir.throttle import TokenBucket
from fakeclock import Clock


def starts(bucket: TokenBucket, clock: Clock, gaps: list[float]) -> list[float]:
    """When each request starts, the caller arriving `gap` seconds after the previous one started."""
    times = []
    for gap in gaps:
        clock.now += gap
        bucket.acquire()
        times.append(clock.now)
    return times


def test_the_first_request_goes_at_once_then_one_every_interval():
    clock = Clock(1000.0)
    bucket = TokenBucket(4.0, clock=clock, sleep=clock.sleep)
    assert starts(bucket, clock, [0, 0, 0, 0]) == [1000.0, 1000.25, 1000.5, 1000.75]


def test_idle_time_does_not_save_up_a_burst():
    clock = Clock(1000.0)
    bucket = TokenBucket(2.0, clock=clock, sleep=clock.sleep)
    times = starts(bucket, clock, [0, 10, 0, 0])  # ten idle seconds, then three at once
    assert times == [1000.0, 1010.0, 1010.5, 1011.0]


def test_a_burst_lets_that_many_go_at_once_then_the_rate_holds():
    clock = Clock(1000.0)
    bucket = TokenBucket(1.0, burst=3, clock=clock, sleep=clock.sleep)
    assert starts(bucket, clock, [0] * 5) == [1000.0, 1000.0, 1000.0, 1001.0, 1002.0]


@given(rate=st.floats(0.1, 100), burst=st.integers(1, 5),
       gaps=st.lists(st.floats(0, 2), min_size=1, max_size=40))
def test_n_requests_never_start_within_n_minus_burst_over_rate(rate, burst, gaps):
    clock = Clock(1000.0)
    bucket = TokenBucket(rate, burst=burst, clock=clock, sleep=clock.sleep)
    times = starts(bucket, clock, gaps)
    for i in range(len(times)):
        for j in range(i + burst, len(times)):  # any window of requests i..j
            assert times[j] - times[i] >= (j - i + 1 - burst) / rate - 1e-9


def test_threads_reserve_distinct_slots():
    """The prefetch thread and the main thread share one limit: with time standing still, N threads
    asking at once are given N different slots, one interval apart."""
    clock = Clock(1000.0)
    waits: list[float] = []
    lock = threading.Lock()
    bucket = TokenBucket(10.0, clock=clock, sleep=lambda s: None)
    barrier = threading.Barrier(8)

    def ask() -> None:
        barrier.wait()
        waited = bucket.acquire()
        with lock:
            waits.append(waited)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(round(w, 6) for w in waits) == [round(n * 0.1, 6) for n in range(8)]


@pytest.mark.parametrize("value", ["-1", "nan", "inf", '"fast"'])
def test_a_bad_limit_is_a_config_error_naming_the_key(tmp_path, value):
    path = tmp_path / "adapter.toml"
    path.write_text(f"[fhir]\nmax_requests_per_s = {value}\n")
    with pytest.raises(ConfigError, match=r"fhir\.max_requests_per_s"):
        load(path)


def test_the_limit_is_off_by_default_and_takes_integers_and_fractions(tmp_path):
    path = tmp_path / "adapter.toml"
    assert load(None).fhir.max_requests_per_s == 0
    path.write_text("[fhir]\nmax_requests_per_s = 5\n")
    assert load(path).fhir.max_requests_per_s == 5.0
    path.write_text("[fhir]\nmax_requests_per_s = 0.5\n")
    assert load(path).fhir.max_requests_per_s == 0.5
