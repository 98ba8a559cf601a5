"""`[fhir] max_requests_per_s`: a client-side limit for servers that throttle (and answer 429 when pushed).

A token bucket of `burst` tokens refilled at `rate` per second, kept as its "theoretical arrival time"
(the GCRA form), so a request reserves its slot under a lock and then sleeps outside it: the main thread
and the prefetch thread share one limit without holding each other up longer than the limit itself does."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import requests
from requests.adapters import HTTPAdapter


class TokenBucket:
    """At most `burst` requests at once, then one every 1/rate seconds: N requests never all start within
    (N - burst) / rate seconds.

    The burst defaults to 1, the plain reading of "requests per second": a server that throttles at r per
    second usually counts over short windows, and a larger burst would let r + burst requests land in the
    same second — exactly the overload the limit is there to avoid."""

    def __init__(self, rate: float, burst: int = 1, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if not rate > 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.interval_s = 1.0 / rate
        self._tolerance_s = (burst - 1) * self.interval_s  # how far ahead of schedule a request may go
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._due = clock()  # when the next request would be on schedule

    def acquire(self) -> float:
        """Wait for this request's slot; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            due = max(self._due, now)
            start = max(now, due - self._tolerance_s)
            self._due = due + self.interval_s
        wait = start - now
        if wait > 0:
            self._sleep(wait)
        return max(wait, 0.0)


class ThrottledAdapter(HTTPAdapter):
    """The session's transport, waiting for a slot before each request. At this level the limit sees
    every request the FHIR session sends: the client's tries and retries, the prefetch thread's pages,
    and the one retry the token auth sends by itself after a 401 (straight to the adapter)."""

    def __init__(self, bucket: TokenBucket, **kwargs: Any):
        super().__init__(**kwargs)
        self.bucket = bucket

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        self.bucket.acquire()
        return super().send(request, *args, **kwargs)
