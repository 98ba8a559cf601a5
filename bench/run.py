"""`make bench`: the adapter against the server's floor and a naive poller, in one run, on a real local server.

For each N: generate N ANC Observations with their Patients, load them into Sekmet (SQLite file,
ANALYZEd), copy the database so each contender starts from the same server state, then measure
(a) the adapter, (b) the least work the server can do for the job: the bare paged search (no
`_lastUpdated`, no processing) plus writing, once, exactly the Flags the adapter ended with (taken from
the adapter's server, sent as the adapter's first writes are: conditional PUTs in transactions of 500),
(c) the naive poller (bench/naive.py). Sekmet serves one request at a time, so its own CPU is the floor
of any client's wall time: it is read from the server process (/proc/<pid>/stat) before and after each
contender. Contenders run as subprocesses: their CPU and peak RSS are theirs alone (wait4)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataset import OBSERVATIONS_PER_PATIENT, patients_and_observations  # noqa: E402

from adapter.config import OutputConfig  # noqa: E402
from adapter.localserver import sekmet, sekmet_process  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def in_load_order(n: int, spread: bool):
    """The dataset as loaded. Spread: every patient's first count, then every second count, and so on, so
    each patient's counts are far apart in `_lastUpdated` order, many pages apart (a backlog of days)."""
    resources = patients_and_observations(n)
    if not spread:
        yield from resources
        return
    rounds: dict[int, list[dict]] = {}
    for resource in resources:
        if resource["resourceType"] == "Patient":
            yield resource
        else:
            rounds.setdefault(int(resource["id"][2:]) % OBSERVATIONS_PER_PATIENT, []).append(resource)  # "bo<n>"
    for k in sorted(rounds):
        yield from rounds[k]


def load(db: Path, n: int, spread: bool = False, chunk: int = 1000) -> float:
    started = time.monotonic()
    with sekmet(database=str(db)) as base_url:
        session = requests.Session()
        entries: list[dict] = []

        def flush() -> None:
            bundle = {"resourceType": "Bundle", "type": "batch", "entry": entries}
            response = session.post(base_url, json=bundle, timeout=600,
                                    headers={"Content-Type": "application/fhir+json"})
            response.raise_for_status()
            entries.clear()

        for resource in in_load_order(n, spread):
            entries.append({"resource": resource,
                            "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}})
            if len(entries) >= chunk:
                flush()
        if entries:
            flush()
    connection = sqlite3.connect(db)
    try:
        connection.execute("ANALYZE")  # Sekmet's query plans need statistics (DOMAIN.md §8)
        connection.commit()
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()
    return time.monotonic() - started


def copy_database(source: Path, target: Path) -> None:
    """SQLite's backup API: a consistent copy whatever is still in the WAL (a file copy can miss it)."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    src.close()
    dst.close()


def run_child(command: list[str]) -> dict:
    """Run a child and read its own CPU time and peak RSS (not those of this process), through
    bench/measured.py: see there why not with wait4 from here."""
    started = time.monotonic()
    figures = tempfile.NamedTemporaryFile(suffix=".json", delete=False)
    figures.close()
    process = subprocess.Popen([sys.executable, str(ROOT / "bench" / "measured.py"), figures.name, *command],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_chunks, err_chunks = [], []
    import threading  # both pipes read fully while the child runs

    def drain(stream, sink):
        sink.append(stream.read())

    threads = [threading.Thread(target=drain, args=(process.stdout, out_chunks)),
               threading.Thread(target=drain, args=(process.stderr, err_chunks))]
    for t in threads:
        t.start()
    exit_code = process.wait()
    for t in threads:
        t.join()
    measured = json.loads(Path(figures.name).read_text())
    Path(figures.name).unlink()
    return {"wall_s": time.monotonic() - started, "exit": exit_code, **measured,
            "stdout": "".join(out_chunks), "stderr": "".join(err_chunks)}


_TICK = os.sysconf("SC_CLK_TCK")
WRITES_PER_BUNDLE = 500  # the adapter's split (ServerSink)


def server_cpu(pid: int) -> float:
    """The server process's own CPU seconds so far (utime + stime; Sekmet is one process)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def final_flags(base_url: str) -> list[dict]:
    """Every Flag on the server (only the adapter writes Flags there), paged."""
    session = requests.Session()
    url, params, flags = f"{base_url}/Flag", {"_count": 1000}, []
    while url:
        bundle = session.get(url, params=params, timeout=600).json()
        params = None
        flags += [e["resource"] for e in bundle.get("entry") or []]
        url = next((l["url"] for l in bundle.get("link", []) if l["relation"] == "next"), None)
    return flags


def write_once(base_url: str, flags: list[dict]) -> int:
    """Write each Flag once, as the adapter's first write of a Flag is sent; returns the requests made."""
    session = requests.Session()
    system = f"{OutputConfig().system_base}/Flag"  # the default [output] system_base
    requests_made = 0
    for start in range(0, len(flags), WRITES_PER_BUNDLE):
        entries = []
        for flag in flags[start:start + WRITES_PER_BUNDLE]:
            body = {k: v for k, v in flag.items() if k not in ("id", "meta")}
            value = next(i["value"] for i in body["identifier"] if i["system"] == system)
            entries.append({"resource": body, "request": {"method": "PUT", "url": f"Flag?identifier={system}|{value}"}})
        # Compact JSON and a minimal answer, as the adapter sends: the least work is the least for the server.
        body = json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}, separators=(",", ":"),
                          ensure_ascii=False).encode()
        response = session.post(base_url, data=body, timeout=600,
                                headers={"Content-Type": "application/fhir+json", "Prefer": "return=minimal"})
        response.raise_for_status()
        requests_made += 1
    return requests_made


def bare_search(base_url: str, page_size: int, since: str | None = None) -> dict:
    """The least reading: the adapter's search without `_lastUpdated`, every page, parsed, nothing else.
    With `since`, the same search with the adapter's `_lastUpdated=ge…` filter (to show what it costs)."""
    session = requests.Session()
    started = time.monotonic()
    url, params, pages, observations = f"{base_url}/Observation", {
        "code": "http://loinc.org|751-8", "_count": page_size, "_include": "Observation:subject",
        "_sort": "_lastUpdated"}, 0, 0
    if since:
        params["_lastUpdated"] = f"ge{since}"
    while url:
        bundle = session.get(url, params=params, timeout=600).json()
        params = None
        entries = bundle.get("entry", [])
        if not entries:
            break
        pages += 1
        observations += sum(1 for e in entries if e["resource"]["resourceType"] == "Observation")
        url = next((l["url"] for l in bundle.get("link", []) if l["relation"] == "next"), None)
    return {"wall_s": time.monotonic() - started, "pages": pages, "observations": observations, "requests": pages}


def least_work(db: Path, page_size: int, flags: list[dict]) -> dict:
    with sekmet_process(database=str(db)) as (base_url, server):
        before = server_cpu(server.pid)
        client_started = time.process_time()
        bare = bare_search(base_url, page_size)
        read = server_cpu(server.pid)
        bare["write_requests"] = write_once(base_url, flags)
        written = server_cpu(server.pid)
        # The least client's own CPU (requests + the standard library's json, nothing else): a scale for the
        # adapter's, since no client that reads and writes this much can spend less than about this.
        bare["client_cpu_s"] = time.process_time() - client_started
        # Not part of the least work: the same pages with the first run's filter (now - 7 days, as
        # [poll] lookback_first_run), which the adapter's search carries.
        since = (datetime.now(timezone.utc) - timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        bare_search(base_url, page_size, since)
        bare.update(server_read_s=read - before, server_write_s=written - read,
                    filtered_read_s=server_cpu(server.pid) - written)
    bare["server_cpu_s"] = bare["server_read_s"] + bare["server_write_s"]
    return bare


def adapter_config(base_url: str, workdir: Path, page_size: int, batch: int = 0) -> Path:
    """The adapter's configuration for a benchmark run: default settings but the page size (and batch)."""
    config = workdir / "adapter.toml"
    config.write_text(f'[fhir]\nbase_url = "{base_url}"\npage_size = {page_size}\ntimeout_s = 600\n'
                      + (f'[poll]\nbatch_observations = {batch}\n' if batch else '')
                      + f'[state]\npath = "{workdir / "state.sqlite3"}"\n')
    return config


def adapter_run(base_url: str, workdir: Path, page_size: int, batch: int = 0) -> dict:
    config = adapter_config(base_url, workdir, page_size, batch)
    result = run_child([sys.executable, "-m", "adapter", "run", "--config", str(config), "--log-format", "json"])
    summaries = [json.loads(l) for l in result["stderr"].splitlines() if '"run-summary"' in l]
    if result["exit"] != 0 or not summaries:
        raise SystemExit(f"adapter run failed ({result['exit']}):\n{result['stderr'][-3000:]}")
    summary = summaries[0]["summary"]
    result.update(processed=summary["observations_read"], http_requests=summary["http_requests"], summary=summary,
                  writes=summary["created"] + summary["updated"])
    return result


STARTUP_OBSERVATIONS = 40  # the start-up run's data: enough for every path to run once (Flags written)


def startup_cpu(workdir: Path, attempt: int) -> float:
    """The adapter's fixed cost: the interpreter, the imports, and the first use of each path (the R4B models
    import their element types and build their validators at the first Flag, not at import). Measured as a
    run over STARTUP_OBSERVATIONS counts, next to each run of the adapter (one_size), so that both see the
    machine as it is then: measured once up front, a slow minute there skewed every size's figure (0.78 s
    against 0.53 s for the same commit)."""
    db = workdir / "startup.sqlite3"
    if not db.exists():
        load(db, STARTUP_OBSERVATIONS)
    copy = workdir / f"startup-{attempt}.sqlite3"
    copy_database(db, copy)
    (workdir / f"startup-{attempt}").mkdir(exist_ok=True)
    with sekmet_process(database=str(copy)) as (base_url, _):
        return adapter_run(base_url, workdir / f"startup-{attempt}", 200)["cpu_s"]


def naive_run(base_url: str, page_size: int, budget_s: float) -> dict:
    result = run_child([sys.executable, str(ROOT / "bench" / "naive.py"), base_url, str(page_size), str(budget_s)])
    if result["exit"] != 0:
        raise SystemExit(f"naive poller failed:\n{result['stderr'][-3000:]}")
    result.update(json.loads(result["stdout"].strip().splitlines()[-1]))
    return result


def least_of(runs: list[dict], least: tuple[str, ...], most: tuple[str, ...] = ()) -> dict:
    """One contender's figures over its repeated runs (the same work each time): these the least of the runs
    (this machine's speed varies from run to run, and whatever else runs only ever adds), `most` the largest,
    the rest (counts, summaries: the same in every run) from the first."""
    merged = dict(runs[0])
    merged.update({key: min(r[key] for r in runs) for key in least})
    merged.update({key: max(r[key] for r in runs) for key in most})
    merged["repeats"] = len(runs)
    return merged


def one_size(n: int, page_size: int, naive_budget_s: float, spread: bool = False,
             batch: int = 0, repeat: int = 1) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"anc-bench-{n}-") as tmp:
        workdir = Path(tmp)
        base_db = workdir / "base.sqlite3"
        load_s = load(base_db, n, spread)
        adapters, leasts, startups, flags = [], [], [], []
        for attempt in range(repeat):  # each run from the same server state, on a copy of its own
            startups.append(startup_cpu(workdir, attempt))
            copy_database(base_db, workdir / f"adapter-{attempt}.sqlite3")
            (workdir / f"adapter-{attempt}").mkdir()
            with sekmet_process(database=str(workdir / f"adapter-{attempt}.sqlite3")) as (base_url, server):
                before = server_cpu(server.pid)
                adapters.append(adapter_run(base_url, workdir / f"adapter-{attempt}", page_size, batch))
                adapters[-1]["server_cpu_s"] = server_cpu(server.pid) - before
                flags = flags or final_flags(base_url)
            copy_database(base_db, workdir / f"least-{attempt}.sqlite3")
            leasts.append(least_work(workdir / f"least-{attempt}.sqlite3", page_size, flags))
        adapter = least_of(adapters, ("cpu_s", "server_cpu_s", "wall_s"), ("peak_rss_mb",))
        adapter["flags"] = len(flags)
        least = least_of(leasts, ("server_read_s", "server_write_s", "filtered_read_s", "client_cpu_s", "wall_s"))
        least["server_cpu_s"] = least["server_read_s"] + least["server_write_s"]
        copy_database(base_db, workdir / "naive.sqlite3")
        with sekmet_process(database=str(workdir / "naive.sqlite3")) as (base_url, server):
            before = server_cpu(server.pid)
            naive = naive_run(base_url, page_size, naive_budget_s)
            naive["server_cpu_s"] = server_cpu(server.pid) - before
    # The least of the start-up runs, as of the adapter's: the conservative choice (the more start-up is
    # subtracted, the less is left per observation).
    return {"n": n, "load_s": load_s, "least": least, "adapter": adapter, "naive": naive,
            "fixed_cpu_s": min(startups)}


def table(result: dict) -> str:
    n, adapter, naive, least = result["n"], result["adapter"], result["naive"], result["least"]
    floor_rate = least["observations"] / least["server_cpu_s"]  # no client can page faster than the server works

    def per_k(r):
        return 1000 * r["http_requests"] / max(r["processed"], 1)

    def rate(r):
        return r["processed"] / r["wall_s"]

    def cpu_us(r, fixed=None):
        if fixed is None:
            return 1e6 * r["cpu_s"] / max(r["processed"], 1)
        # The start-up run processed STARTUP_OBSERVATIONS counts too: per observation beyond them.
        return 1e6 * max(r["cpu_s"] - fixed, 0) / max(r["processed"] - STARTUP_OBSERVATIONS, 1)

    least_requests = least["requests"] + least["write_requests"]
    rows = [
        ("server CPU s (read + write)", f"{adapter['server_cpu_s']:.2f}",
         f"{least['server_read_s']:.2f} + {least['server_write_s']:.2f}", f"{naive['server_cpu_s']:.2f}"),
        ("server CPU, adapter / least", f"{adapter['server_cpu_s'] / least['server_cpu_s']:.2f}", "1.00", "-"),
        ("observations per second", f"{rate(adapter):,.0f}", f"{floor_rate:,.0f}", f"{rate(naive):,.0f}"),
        ("throughput / floor", f"{rate(adapter) / floor_rate:.2f}", "1.00", f"{rate(naive) / floor_rate:.2f}"),
        ("client CPU µs per observation (whole process)", f"{cpu_us(adapter):,.0f}", "-", f"{cpu_us(naive):,.0f}"),
        ("client CPU µs per observation (net of start-up)", f"{cpu_us(adapter, result['fixed_cpu_s']):,.0f}",
         f"{1e6 * least['client_cpu_s'] / max(least['observations'], 1):,.0f}", f"{cpu_us(naive):,.0f}"),
        ("HTTP requests per 1,000 observations", f"{per_k(adapter):,.1f}",
         f"{1000 * least_requests / max(least['observations'], 1):,.1f}", f"{per_k(naive):,.1f}"),
        ("Flag writes (distinct Flags)", f"{adapter['writes']:,} ({adapter['flags']:,})", f"{adapter['flags']:,}", "-"),
        ("peak RSS MB", f"{adapter['peak_rss_mb']:,.1f}", "-", f"{naive['peak_rss_mb']:,.1f}"),
    ]
    naive_note = (f"naive stopped by its time budget after {naive['processed']:,} observations; its figures are rates"
                  if naive.get("stopped_by_budget") else f"naive processed all {naive['processed']:,}")
    lines = [
        f"N = {n:,} observations ({n // 4:,} patients); load {result['load_s']:.0f} s; {naive_note}; "
        f"adapter and least work run {adapter['repeats']} times each: CPU and wall time the least of them, "
        f"peak RSS the largest",
        f"least work: {least['observations']:,} observations in {least['pages']} pages, "
        f"{adapter['flags']:,} Flags in {least['write_requests']} transactions; the same pages with the adapter's "
        f"`_lastUpdated` filter cost the server {least['filtered_read_s']:.2f} s (bare: {least['server_read_s']:.2f} s)",
        f"adapter: {adapter['processed']:,} read in {adapter['wall_s']:.1f} s, exit {adapter['exit']}, "
        f"{adapter['summary']['pages']} pages, summary {json.dumps(adapter['summary']['classified'])}, "
        f"quarantined {adapter['summary']['quarantined']}, rewrites {adapter['writes'] - adapter['flags']:,}",
        "",
        f"| {'metric':<48} | {'adapter':>14} | {'least work':>14} | {'naive':>10} |",
        f"|{'-' * 50}|{'-' * 16}|{'-' * 16}|{'-' * 12}|",
    ]
    for label, a, f, b in rows:
        lines.append(f"| {label:<48} | {a:>14} | {f:>14} | {b:>10} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--page-size", type=int, default=1000, help="the adapter's default")
    parser.add_argument("--naive-budget", type=float, default=120.0, help="seconds the naive poller may run")
    parser.add_argument("--spread", action="store_true",
                        help="load each patient's counts far apart (every first count, then every second, ...)")
    parser.add_argument("--batch", type=int, default=0, help="the adapter's [poll] batch_observations")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of the adapter and of the least work per size (their least CPU is reported)")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{platform.platform()}")
    print(f"data: {'spread (a patient’s counts far apart)' if args.spread else 'each patient’s counts together'}; "
          f"[poll] batch_observations = {args.batch}\n")
    for n in args.sizes:
        result = one_size(n, args.page_size, args.naive_budget, args.spread, args.batch, args.repeat)
        print(f"adapter start-up CPU (a run over {STARTUP_OBSERVATIONS} counts before each of its runs, least of "
              f"{args.repeat}): {result['fixed_cpu_s']:.2f} s")
        print(table(result) + "\n", flush=True)


if __name__ == "__main__":
    main()
