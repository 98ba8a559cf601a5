"""`make bench`: the adapter against a naive poller on the same data, in one run, on a real local server.

For each N: generate N ANC Observations with their Patients, load them into Sekmet (SQLite file,
ANALYZEd), copy the database so each contender starts from the same server state, then measure
(a) the bare search pages with no processing (the server's limit), (b) the adapter, (c) the naive
poller (bench/naive.py). Contenders run as subprocesses: CPU and peak RSS are theirs alone (wait4)."""

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
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataset import patients_and_observations  # noqa: E402

from adapter.localserver import sekmet  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def load(db: Path, n: int, chunk: int = 1000) -> float:
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

        for resource in patients_and_observations(n):
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
    """Run a child and read its own CPU time and peak RSS with wait4 (not those of this process)."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_chunks, err_chunks = [], []
    # Read both pipes fully, then reap with wait4 to get the child's rusage.
    import threading

    def drain(stream, sink):
        sink.append(stream.read())

    threads = [threading.Thread(target=drain, args=(process.stdout, out_chunks)),
               threading.Thread(target=drain, args=(process.stderr, err_chunks))]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(process.pid, 0)
    for t in threads:
        t.join()
    return {"wall_s": time.monotonic() - started, "exit": os.waitstatus_to_exitcode(status),
            "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
            "stdout": "".join(out_chunks), "stderr": "".join(err_chunks)}


def bare_search(base_url: str, page_size: int) -> dict:
    """The server's limit: the adapter's search, every page, parsed, nothing else."""
    session = requests.Session()
    started = time.monotonic()
    url, params, pages, observations = f"{base_url}/Observation", {
        "code": "http://loinc.org|751-8", "_count": page_size, "_include": "Observation:subject",
        "_sort": "_lastUpdated"}, 0, 0
    while url:
        bundle = session.get(url, params=params, timeout=600).json()
        params = None
        entries = bundle.get("entry", [])
        if not entries:
            break
        pages += 1
        observations += sum(1 for e in entries if e["resource"]["resourceType"] == "Observation")
        url = next((l["url"] for l in bundle.get("link", []) if l["relation"] == "next"), None)
    return {"wall_s": time.monotonic() - started, "pages": pages, "observations": observations}


def adapter_run(base_url: str, workdir: Path, page_size: int) -> dict:
    config = workdir / "adapter.toml"
    config.write_text(f'[fhir]\nbase_url = "{base_url}"\npage_size = {page_size}\ntimeout_s = 600\n'
                      f'[state]\npath = "{workdir / "state.sqlite3"}"\n')
    result = run_child([sys.executable, "-m", "adapter", "run", "--config", str(config), "--log-format", "json"])
    summaries = [json.loads(l) for l in result["stderr"].splitlines() if '"run-summary"' in l]
    if result["exit"] != 0 or not summaries:
        raise SystemExit(f"adapter run failed ({result['exit']}):\n{result['stderr'][-3000:]}")
    summary = summaries[0]["summary"]
    result.update(processed=summary["observations_read"], http_requests=summary["http_requests"], summary=summary)
    return result


def startup_cpu(workdir: Path) -> float:
    """The adapter's fixed cost (interpreter, imports, one /metadata, an empty search)."""
    with sekmet() as base_url:
        result = adapter_run(base_url, workdir, 200)
    return result["cpu_s"]


def naive_run(base_url: str, page_size: int, budget_s: float) -> dict:
    result = run_child([sys.executable, str(ROOT / "bench" / "naive.py"), base_url, str(page_size), str(budget_s)])
    if result["exit"] != 0:
        raise SystemExit(f"naive poller failed:\n{result['stderr'][-3000:]}")
    result.update(json.loads(result["stdout"].strip().splitlines()[-1]))
    return result


def one_size(n: int, page_size: int, naive_budget_s: float, fixed_cpu_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"anc-bench-{n}-") as tmp:
        workdir = Path(tmp)
        base_db = workdir / "base.sqlite3"
        load_s = load(base_db, n)
        for name in ("adapter", "naive"):
            copy_database(base_db, workdir / f"{name}.sqlite3")
        (workdir / "adapter").mkdir()
        with sekmet(database=str(workdir / "adapter.sqlite3")) as base_url:
            bare = bare_search(base_url, page_size)
            adapter = adapter_run(base_url, workdir / "adapter", page_size)
        with sekmet(database=str(workdir / "naive.sqlite3")) as base_url:
            naive = naive_run(base_url, page_size, naive_budget_s)
    return {"n": n, "load_s": load_s, "bare": bare, "adapter": adapter, "naive": naive, "fixed_cpu_s": fixed_cpu_s}


def table(result: dict) -> str:
    n, adapter, naive, bare = result["n"], result["adapter"], result["naive"], result["bare"]

    def per_k(r):
        return 1000 * r["http_requests"] / max(r["processed"], 1)

    def rate(r):
        return r["processed"] / r["wall_s"]

    def cpu_us(r, fixed=0.0):
        return 1e6 * max(r["cpu_s"] - fixed, 0) / max(r["processed"], 1)

    rows = [
        ("HTTP requests per 1,000 observations", per_k(adapter), per_k(naive), "{:,.1f}", per_k(adapter) / per_k(naive)),
        ("observations per second", rate(adapter), rate(naive), "{:,.0f}", rate(adapter) / rate(naive)),
        ("CPU µs per observation (whole process)", cpu_us(adapter), cpu_us(naive), "{:,.0f}", cpu_us(adapter) / cpu_us(naive)),
        ("CPU µs per observation (net of start-up)", cpu_us(adapter, result["fixed_cpu_s"]), cpu_us(naive), "{:,.0f}",
         cpu_us(adapter, result["fixed_cpu_s"]) / cpu_us(naive)),
        ("peak RSS MB", adapter["peak_rss_mb"], naive["peak_rss_mb"], "{:,.1f}", adapter["peak_rss_mb"] / naive["peak_rss_mb"]),
    ]
    naive_note = (f"naive stopped by its time budget after {naive['processed']:,} observations; its figures are rates"
                  if naive.get("stopped_by_budget") else f"naive processed all {naive['processed']:,}")
    lines = [
        f"N = {n:,} observations ({n // 4:,} patients); load {result['load_s']:.0f} s; {naive_note}",
        f"bare search (server limit): {bare['observations']:,} observations in {bare['pages']} pages, "
        f"{bare['wall_s']:.1f} s = {bare['observations'] / bare['wall_s']:,.0f} obs/s",
        f"adapter: {adapter['processed']:,} read in {adapter['wall_s']:.1f} s, exit {adapter['exit']}, "
        f"summary {json.dumps(adapter['summary']['classified'])}, quarantined {adapter['summary']['quarantined']}",
        "",
        f"| {'metric':<42} | {'adapter':>10} | {'naive':>10} | {'adapter/naive':>13} |",
        f"|{'-' * 44}|{'-' * 12}|{'-' * 12}|{'-' * 15}|",
    ]
    for label, a, b, fmt, ratio in rows:
        lines.append(f"| {label:<42} | {fmt.format(a):>10} | {fmt.format(b):>10} | {ratio:>13.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--page-size", type=int, default=1000, help="the adapter's default")
    parser.add_argument("--naive-budget", type=float, default=120.0, help="seconds the naive poller may run")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{platform.platform()}")
    with tempfile.TemporaryDirectory() as tmp:
        fixed = startup_cpu(Path(tmp))
    print(f"adapter start-up CPU (empty server): {fixed:.2f} s\n")
    for n in args.sizes:
        print(table(one_size(n, args.page_size, args.naive_budget, fixed)) + "\n", flush=True)


if __name__ == "__main__":
    main()
