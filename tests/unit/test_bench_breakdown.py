"""bench/breakdown.py: its stages still name functions the adapter calls, and each stage's CPU is its own."""

import inspect
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import breakdown  # noqa: E402

from adapter import state  # noqa: E402


def test_every_stage_names_a_plain_function_of_the_adapter():
    # A renamed or removed function would otherwise leave its stage at zero and its time in "the rest".
    found = breakdown.targets()
    assert len(found) == len(breakdown.STAGES)
    for label, owner, name in found:
        function = inspect.unwrap(getattr(owner, name))
        assert callable(function), label
        # A generator's call only builds it: its work would be charged to whoever iterates it.
        assert not inspect.isgeneratorfunction(function), label


def test_a_stage_is_charged_its_own_time_less_the_stages_it_calls():
    now = [0.0]

    def clock():
        return now[0]

    timers = breakdown.Timers(clock)

    def inner():
        now[0] += 3.0

    inner = timers.wrap("inner", inner)

    def outer():
        now[0] += 1.0
        inner()
        now[0] += 2.0
        inner()

    outer = timers.wrap("outer", outer)
    outer()
    outer()
    assert timers.spent == {"inner": 12.0, "outer": 6.0}
    assert timers.calls == {"inner": 4, "outer": 2}
    assert sum(timers.spent.values()) == now[0]  # nothing counted twice, nothing lost


def test_a_stage_that_raises_is_still_charged():
    now = [0.0]
    timers = breakdown.Timers(lambda: now[0])

    def failing():
        now[0] += 5.0
        raise ValueError("no")

    failing = timers.wrap("failing", failing)
    try:
        failing()
    except ValueError:
        pass
    assert timers.spent == {"failing": 5.0}


def test_the_ledger_rows_are_written_in_both_table_forms():
    # The WITHOUT ROWID form is cut from the state's own schema: a change there must not break it silently.
    db = sqlite3.connect(":memory:")
    db.execute(breakdown.without_rowid_ledger())
    (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'observations'").fetchone()
    assert sql.endswith("WITHOUT ROWID")
    columns = [row[1] for row in db.execute("PRAGMA table_info(observations)")]
    assert columns == list(state._CLASSIFIED_COLUMNS)  # every column the adapter's statement writes
    for without_rowid in (False, True):
        assert breakdown.ledger_rows(50, without_rowid) > 0
