"""SIGTERM and SIGINT during a run: stop at the next safe point (CONTRACT §1, exit 6).

The handler only sets a flag. The pipeline looks at it between pages (after a page's state committed),
and every wait on the server gives up as soon as it is set (adapter/fhir/client.py): the request itself
is left to a daemon thread, so a slow or hung server cannot hold the stop for a whole timeout. Giving up
a write in flight is safe for the same reason a kill is: the page's SQLite transaction rolls back, and
the rerun repeats the page's idempotent PUTs. A second signal ends the process at once."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stop(threading.Event):
    """Set by the first SIGTERM/SIGINT. The main thread only ever reads it (is_set): a signal handler
    runs in the main thread, and setting an Event takes a lock the main thread must never hold then."""

    signal_name: str | None = None


@contextmanager
def on_signals() -> Iterator[Stop]:
    """Install the handlers for the block (a `run`), restore the previous ones after it."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signals are delivered to the main thread only: nothing to install here
        return

    def handle(signum: int, frame: object) -> None:
        if stop.is_set():
            # A second signal: the operator will not wait. Die by the signal, as a kill would (state
            # stays consistent: SQLite drops the open transaction, the rerun repeats the page). PID 1
            # in a container ignores a signal's default action, hence the explicit exit after it.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            os._exit(128 + signum)
        stop.signal_name = signal.Signals(signum).name
        stop.set()

    previous = {signum: signal.signal(signum, handle) for signum in SIGNALS}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
