"""A monotonic clock for tests of waiting: time stands still unless someone sleeps, then it moves on by
exactly that long (so tests assert the waits themselves, never wall-clock time)."""

from __future__ import annotations


class Clock:
    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
