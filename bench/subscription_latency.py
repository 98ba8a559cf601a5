"""Notification -> Flag latency of Subscription mode on the real local FHIR server (Sekmet).

Starts Sekmet and `anc-adapter serve` with `[serve] subscriptions = true` (both on loopback), then writes
N severe ANC Observations one at a time, each for its own patient, and for each measures
- poll: from just before the Observation's PUT to the first Flag search that finds its Flag (polled every
  20 ms, so this includes up to 20 ms of polling granularity), and
- server: from the Observation's meta.lastUpdated to its Flag's meta.lastUpdated (the server's clock).
Prints median, p90 and max of each, and the whole result as JSON.

    .venv/bin/python bench/subscription_latency.py --count 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests

from adapter.localserver import sekmet

FHIR_JSON = {"Content-Type": "application/fhir+json"}
LOINC = "http://loinc.org"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20, help="Observations to write (default 20)")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between writes (default 0.5)")
    args = parser.parse_args()
    with sekmet() as base_url, tempfile.TemporaryDirectory(prefix="anc-latency-") as workdir:
        directory = Path(workdir)
        config = directory / "adapter.toml"
        config.write_text(f'[fhir]\nbase_url = "{base_url}"\n[state]\npath = "{directory}/state.sqlite3"\n'
                          '[serve]\nsubscriptions = true\n')
        serve, log_path = _serve(config, directory)
        try:
            patients = [f"lat-{i}" for i in range(args.count)]
            _post(base_url, [_patient(p) for p in patients])
            poll, server = [], []
            effective = (datetime.now(timezone.utc) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
            for patient_id in patients:
                observation = _anc(f"{patient_id}-1", patient_id, effective)
                started = time.perf_counter()
                written = requests.put(f"{base_url}/Observation/{observation['id']}", json=observation,
                                       headers=FHIR_JSON, timeout=30).json()
                flag = _wait_for_flag(base_url, patient_id)
                poll.append(time.perf_counter() - started)
                server.append((_instant(flag["meta"]["lastUpdated"]) -
                               _instant(written["meta"]["lastUpdated"])).total_seconds())
                time.sleep(args.pause)
            batches = [e for e in _events(log_path) if e.get("event") == "notified-batch"]
        finally:
            serve.terminate()
            serve.wait(timeout=30)
    result = {"count": args.count, "poll_s": _stats(poll), "server_s": _stats(server), "batches": len(batches)}
    print(f"notification -> Flag, {args.count} Observations written one at a time on Sekmet:")
    for name, label in (("poll_s", "seen by a client polling"), ("server_s", "server lastUpdated to lastUpdated")):
        stats = result[name]
        print(f"  {label:34} median {stats['median'] * 1000:6.0f} ms   p90 {stats['p90'] * 1000:6.0f} ms"
              f"   max {stats['max'] * 1000:6.0f} ms")
    print(json.dumps(result))
    return 0


def _serve(config: Path, directory: Path) -> tuple[subprocess.Popen, Path]:
    log_path = directory / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "adapter", "serve", "--config", str(config), "--host", "127.0.0.1", "--port", "0",
         "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited:\n{log_path.read_text()[-2000:]}")
        if any(e.get("event") == "serve-start" for e in _events(log_path)):
            time.sleep(0.5)  # uvicorn accepts right after the start-up line
            return process, log_path
        time.sleep(0.05)
    process.terminate()
    raise RuntimeError("serve did not start within 60 s")


def _wait_for_flag(base_url: str, patient_id: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        bundle = requests.get(f"{base_url}/Flag", params={"subject": f"Patient/{patient_id}"}, timeout=30).json()
        if bundle.get("entry"):
            return bundle["entry"][0]["resource"]
        time.sleep(0.02)
    raise RuntimeError(f"no Flag for {patient_id} within {timeout_s:.0f} s")


def _events(log_path: Path) -> list[dict]:
    found = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            pass
    return found


def _post(base_url: str, resources: list[dict]) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources]}
    response = requests.post(base_url, json=bundle, headers=FHIR_JSON, timeout=60)
    response.raise_for_status()


def _patient(patient_id: str) -> dict:
    return {"resourceType": "Patient", "id": patient_id, "birthDate": "1970-01-01"}


def _anc(observation_id: str, patient_id: str, effective: str) -> dict:
    return {"resourceType": "Observation", "id": observation_id, "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "751-8"}]},
            "subject": {"reference": f"Patient/{patient_id}"}, "effectiveDateTime": effective,
            "valueQuantity": {"value": 0.3, "unit": "10*3/uL", "system": "http://unitsofmeasure.org",
                              "code": "10*3/uL"}}


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, max(0, round(0.9 * len(ordered)) - 1))]
    return {"median": round(statistics.median(ordered), 4), "p90": round(p90, 4), "max": round(ordered[-1], 4)}


if __name__ == "__main__":
    sys.exit(main())
