"""Named points where a test can kill the process (SIGKILL) to prove crash safety (issue 4).

Inert in production: nothing happens unless ANC_ADAPTER_TEST_CRASH_AT is set, e.g.
`ANC_ADAPTER_TEST_CRASH_AT=write-accepted:2` kills the process the 2nd time it reaches that point."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

ENV = "ANC_ADAPTER_TEST_CRASH_AT"
POINTS = ("page-read", "classified", "during-write", "write-accepted", "committed")
_reached: Counter[str] = Counter()


def reach(point: str) -> None:
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    name, _, nth = wanted.partition(":")
    if name != point:
        return
    _reached[point] += 1
    if _reached[point] != int(nth or 1):
        return
    if point == "during-write":
        # Die while the request is in flight: the server may or may not have committed it.
        threading.Timer(0.005, os.kill, (os.getpid(), signal.SIGKILL)).start()
        return
    os.kill(os.getpid(), signal.SIGKILL)
