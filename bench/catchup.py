"""Catch-up under a time budget: how many `run --max-duration S` it takes to drain a backlog, and how many
Observations those runs read in all (a run that re-reads from the watermark each time reads the same
pages again and again; with a resume point each run goes on where the last one stopped).

    .venv/bin/python bench/catchup.py [--observations 6000] [--page-size 500] [--max-duration 1]
                                      [--adapter-src DIR]

--adapter-src runs another copy of the adapter package (e.g. an older commit unpacked with
`git archive <commit> adapter | tar -x -C DIR`) against the same data, for a before/after."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataset import patients_and_observations  # noqa: E402

from adapter.localserver import sekmet  # noqa: E402


def load(base_url: str, n: int, chunk: int = 1000) -> None:
    session = requests.Session()
    entries: list[dict] = []
    for resource in patients_and_observations(n):
        entries.append({"resource": resource,
                        "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}})
        if len(entries) >= chunk:
            _post(session, base_url, entries)
    if entries:
        _post(session, base_url, entries)


def _post(session: requests.Session, base_url: str, entries: list[dict]) -> None:
    response = session.post(base_url, json={"resourceType": "Bundle", "type": "batch", "entry": entries},
                            headers={"Content-Type": "application/fhir+json"}, timeout=600)
    response.raise_for_status()
    entries.clear()


def drain(base_url: str, workdir: Path, page_size: int, max_duration: float, adapter_src: str | None,
          max_runs: int) -> list[dict]:
    config = workdir / "adapter.toml"
    config.write_text(f'[fhir]\nbase_url = "{base_url}"\npage_size = {page_size}\n'
                      f'[state]\npath = "{workdir / "state.sqlite3"}"\n')
    env = dict(os.environ)
    if adapter_src:
        env["PYTHONPATH"] = adapter_src
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    runs = []
    for _ in range(max_runs):
        done = subprocess.run([sys.executable, "-m", "adapter", "run", "--config", str(config),
                               "--max-duration", str(max_duration), "--log-format", "json"],
                              env=env, cwd=workdir, capture_output=True, text=True, timeout=600)
        lines = [json.loads(line) for line in done.stderr.splitlines() if '"run-summary"' in line]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"run failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        runs.append(lines[0]["summary"])
        if runs[-1]["complete"]:
            break
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observations", type=int, default=6000)
    parser.add_argument("--page-size", type=int, default=500)
    parser.add_argument("--max-duration", type=float, default=1.0)
    parser.add_argument("--adapter-src", help="directory holding another copy of the adapter package")
    parser.add_argument("--max-runs", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="anc-catchup-") as work, sekmet(str(Path(work, "db.sqlite3"))) as url:
        load(url, args.observations)
        runs = drain(url, Path(work), args.page_size, args.max_duration, args.adapter_src, args.max_runs)
    read = [r["observations_read"] for r in runs]
    print(json.dumps({
        "adapter": args.adapter_src or "this checkout",
        "observations": args.observations, "page_size": args.page_size, "max_duration_s": args.max_duration,
        "runs": len(runs), "drained": runs[-1]["complete"], "observations_read": sum(read),
        "read_per_run": read, "pages_per_run": [r["pages"] for r in runs],
    }))


if __name__ == "__main__":
    main()
