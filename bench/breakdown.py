"""Where the adapter's own CPU goes, stage by stage, in a real run against Sekmet (issue 13's CPU goal).

Each repeat is a fresh process (`--worker`) that starts Sekmet on a copy of the benchmark's database,
runs the adapter over the 40-count start-up data twice (the first run puts the imports, the first
validation of each Flag shape and the other first uses behind it; the second, what any run costs, is
subtracted: net of start-up, as in bench/run.py), then `anc-adapter run` over N counts, in-process, with
the garbage-collector settings of the console script.
Every thread's CPU (`time.thread_time`) is charged to the stage it is in, exclusively: a stage's figure
leaves out the stages it calls (a context read's HTTP is HTTP, not context). What no stage covers
(paging, the batch loop, SQLite commits, threads, the garbage collector) is "the rest". The timers cost
about a µs a call themselves: calibrated in each run and taken off, and the same run without them is
measured too (alternated with the timed ones). Each figure is the median of the repeats.

    .venv/bin/python bench/breakdown.py --n 10000 --repeat 3
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# (label, module, attribute path): each a plain function or method (never a generator: a generator's
# call only builds it). In the order the table shows them.
STAGES = (
    ("HTTP: requests and sockets", "adapter.fhir.client", "FhirClient._send_once"),
    ("JSON: parsing responses", "adapter.fhir.client", "_parsed"),
    ("extracting each count", "adapter.pipeline", "Run._extract"),
    ("grading each count", "adapter.pipeline", "Run._record"),
    ("ledger: writing the counts' rows", "adapter.state", "State.record_classified_many"),
    ("ledger: looking up the counts", "adapter.state", "State.ledgers"),
    ("ledger: the pass's read set", "adapter.pipeline", "Run._note_pass"),
    ("reading back for planning", "adapter.state", "State.readings_of"),
    ("reading back for planning", "adapter.state", "State.context_facts_of"),
    ("reading back for planning", "adapter.state", "State.read_written"),
    ("assessing each patient", "adapter.clinical.assess", "assess"),
    ("planning: Flags built, hashed, checked", "adapter.writeback", "plan_patient"),
    ("sending: bundles and what was accepted", "adapter.pipeline", "ServerSink.send"),
    ("recording what was written", "adapter.state", "State.record_written_many"),
    ("clinical context read", "adapter.pipeline", "Run._read_context"),
)


class Timers:
    """Exclusive thread CPU per stage: a stage's own time, less that of the stages it calls."""

    def __init__(self, clock=time.thread_time) -> None:
        self.spent: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()
        self._local = threading.local()
        self._clock = clock

    def wrap(self, label: str, function):
        local, spent, calls, clock = self._local, self.spent, self.calls, self._clock

        @functools.wraps(function)
        def timed(*args, **kwargs):
            stack = getattr(local, "stack", None)
            if stack is None:
                stack = local.stack = []
            stack.append(0.0)
            started = clock()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = clock() - started
                inner = stack.pop()
                spent[label] += elapsed - inner
                calls[label] += 1
                if stack:
                    stack[-1] += elapsed

        return timed

    def install(self) -> None:
        for label, owner, name in targets():
            setattr(owner, name, self.wrap(label, getattr(owner, name)))


def calibrate(calls: int = 20_000) -> tuple[float, float]:
    """The timers' own CPU per call: the part charged to the stage itself, and the rest (its caller's)."""
    timers = Timers()
    timed, plain = timers.wrap("nothing", lambda: None), (lambda: None)
    started = time.thread_time()
    for _ in range(calls):
        timed()
    with_timer = time.thread_time() - started
    started = time.thread_time()
    for _ in range(calls):
        plain()
    without = time.thread_time() - started
    inside = timers.spent["nothing"] / calls
    return inside, max(0.0, (with_timer - without) / calls - inside)


def targets() -> list[tuple[str, object, str]]:
    """Each stage's (label, the module or class holding the function, its name)."""
    found = []
    for label, module_name, path in STAGES:
        owner = importlib.import_module(module_name)
        *outer, name = path.split(".")
        for part in outer:
            owner = getattr(owner, part)
        found.append((label, owner, name))
    return found


def adapter_in_process(db: Path, workdir: Path, page_size: int) -> float:
    """One `anc-adapter run` in this process, on a fresh copy of `db` and an empty state: its CPU (every
    thread; Sekmet is a process of its own)."""
    from adapter import cli
    workdir.mkdir(parents=True, exist_ok=True)
    copy = workdir / "server.sqlite3"
    bench.copy_database(db, copy)
    with bench.sekmet_process(database=str(copy)) as (base_url, _):
        config = bench.adapter_config(base_url, workdir, page_size)
        started = time.process_time()
        code = cli.main(["run", "--config", str(config), "--log-format", "json", "--log-level", "ERROR"])
        spent = time.process_time() - started
    if code != 0:
        raise SystemExit(f"the adapter's run exited {code}")
    return spent


def worker(db: Path, startup_db: Path, page_size: int, timed: bool) -> dict:
    """The start-up run once to warm up, then again, measured: what a run costs whatever its size (state
    created, the server's CapabilityStatement read, …), subtracted from the measured run over N, as
    bench/run.py subtracts its start-up run."""
    from adapter import cli
    with tempfile.TemporaryDirectory(prefix="anc-breakdown-") as tmp:
        # As the console script does (adapter.cli.console): the imports' objects frozen, young collections
        # every _YOUNG_COLLECTION_EVERY containers.
        gc.freeze()
        gc.set_threshold(cli._YOUNG_COLLECTION_EVERY, *gc.get_threshold()[1:])
        adapter_in_process(startup_db, Path(tmp) / "warm-up", 200)
        timers = Timers()
        if timed:
            timers.install()
        fixed = adapter_in_process(startup_db, Path(tmp) / "startup", 200)
        fixed_stages, fixed_calls = dict(timers.spent), dict(timers.calls)
        spent = adapter_in_process(db, Path(tmp) / "run", page_size)
    inside, outside = calibrate()
    # Less the timers' own cost: each call's share inside its stage from that stage, all of it from the
    # whole (the rest is what is left of the whole after the stages).
    calls = {label: n - fixed_calls.get(label, 0) for label, n in timers.calls.items()}
    return {"cpu_s": spent - fixed - sum(calls.values()) * (inside + outside),
            "stages": {label: s - fixed_stages.get(label, 0.0) - calls[label] * inside
                       for label, s in timers.spent.items()},
            "calls": calls, "timer_us": [1e6 * inside, 1e6 * outside]}


def ledger_rows(n: int, without_rowid: bool) -> float:
    """CPU to write n ledger rows alone, in one transaction, with the adapter's own statement into a new
    state file (its schema, WAL, synchronous=FULL), the observations table as it is or as a WITHOUT ROWID
    table: whether a leaner table would make the ledger cheaper."""
    from adapter import state as state_module
    rows = [(f"bo{i}", "1", "final", f"bp{i // 4}", "classified", "2026-11-01T06:00:00+00:00", 1234.5, "", None,
             "mild", 0, "adult", "[]", "[]", "2026-11-26T12:00:00.000+00:00", "2026-11-26T11:00:00.000Z")
            for i in range(n)]
    with tempfile.TemporaryDirectory(prefix="anc-ledger-") as tmp:
        state = state_module.State.open(Path(tmp) / "state.sqlite3")
        if without_rowid:
            state.db.execute("DROP TABLE observations")
            state.db.execute(without_rowid_ledger())
            state.db.execute("CREATE INDEX observations_patient ON observations (patient_id, outcome)")
        started = time.process_time()
        with state.transaction():
            state._upsert_rows(state_module._record_classified_sql, rows, 1, state_module._ROWS_PER_INSERT)
        spent = time.process_time() - started
        state.db.close()
    return spent


def without_rowid_ledger() -> str:
    """The state's own CREATE TABLE of the ledger, as a WITHOUT ROWID table."""
    from adapter import state as state_module
    table = re.search(r"CREATE TABLE IF NOT EXISTS observations \(.*?\n\)(?=;)", state_module._SCHEMA, re.S)
    return table.group(0) + " WITHOUT ROWID"


def one(db: Path, startup_db: Path, page_size: int, timed: bool) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(db), str(startup_db),
               str(page_size), "timed" if timed else "plain"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"breakdown worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        db, startup_db, page_size, mode = sys.argv[2:6]
        print(json.dumps(worker(Path(db), Path(startup_db), int(page_size), mode == "timed")))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the loaded databases here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="anc-breakdown-data-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        db, startup_db = workdir / f"bench-{args.n}.sqlite3", workdir / "startup.sqlite3"
        if not db.exists():
            print(f"loading {args.n:,} Observations with their Patients into Sekmet…", file=sys.stderr)
            bench.load(db, args.n)
        if not startup_db.exists():
            bench.load(startup_db, bench.STARTUP_OBSERVATIONS)
        plain, timed = [], []
        for _ in range(args.repeat):  # alternated, so both see the machine alike
            plain.append(one(db, startup_db, args.page_size, timed=False))
            timed.append(one(db, startup_db, args.page_size, timed=True))
    per = 1e6 / (args.n - bench.STARTUP_OBSERVATIONS)  # the start-up run's counts are subtracted too
    labels = list(dict.fromkeys(label for label, _, _ in STAGES))
    rows = [(label, statistics.median(r["stages"].get(label, 0.0) for r in timed) * per) for label in labels]
    timed_total = statistics.median(r["cpu_s"] for r in timed) * per
    rest = timed_total - sum(us for _, us in rows)
    print(f"\nWhere the adapter's CPU goes: {args.n:,} counts, pages of {args.page_size}, net of start-up, "
          f"median of {args.repeat} runs (µs per observation)\n")
    print("| stage | µs / observation | share |\n|---|---:|---:|")
    for label, us in rows + [("the rest (paging, the batch loop, commits, threads, GC)", rest)]:
        print(f"| {label} | {us:.1f} | {100 * us / timed_total:.0f} % |")
    print(f"| **all** (the timed runs, less the timers' own cost) | **{timed_total:.1f}** | 100 % |")
    plain_us = [r["cpu_s"] * per for r in plain]
    calls = statistics.median(sum(r["calls"].values()) for r in timed) / (args.n - bench.STARTUP_OBSERVATIONS)
    inside, outside = (statistics.median(r["timer_us"][i] for r in timed) for i in (0, 1))
    print(f"\nThe timers: {calls:.1f} timed calls per observation, each costing {inside:.2f} µs inside its stage "
          f"and {outside:.2f} µs outside it (calibrated in each run), taken off.")
    ledger = {form: [] for form in ("rowid", "WITHOUT ROWID")}
    for _ in range(args.repeat):
        for form in ledger:
            ledger[form].append(ledger_rows(args.n, form != "rowid") * 1e6 / args.n)
    print("The ledger's rows alone, written with the adapter's statement into a new state (µs per row, least "
          f"of {args.repeat}): " + ", ".join(f"{form} table {min(us):.1f}" for form, us in ledger.items()) + ".")
    print(f"The same run without the timers: {min(plain_us):.1f} µs per observation (least of {args.repeat}; "
          f"all: {', '.join(f'{u:.1f}' for u in plain_us)}). Machine: {platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}.")


if __name__ == "__main__":
    main()
