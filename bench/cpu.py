"""Adapter CPU per observation without HTTP: pages of synthetic Observations (JSON text, as they come
off the wire) through parse -> extract -> classify -> ledger -> plan, with an in-memory state and a sink
that only counts. `--normal-only` measures the goal of ≤ 50 µs per normal observation."""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataset import patients_and_observations  # noqa: E402

from adapter import config as config_module  # noqa: E402
from adapter import extract, mappings  # noqa: E402
from adapter.pipeline import DryRunSink, Run  # noqa: E402
from adapter.state import State  # noqa: E402
from adapter.writeback import Output  # noqa: E402


class NoClient:
    request_count = 0

    def get(self, path, *args, **kwargs):
        if path == "metadata":  # the context searches are declared, and answer nothing (below)
            return {"resourceType": "CapabilityStatement", "rest": [{"mode": "server", "resource": [
                {"type": kind, "interaction": [{"code": "search-type"}],
                 "searchParam": [{"name": n} for n in ("subject", "code", "date", "effective-time",
                                                       "authoredon", "_lastUpdated")]}
                for kind in ("Observation", "MedicationAdministration", "MedicationRequest", "Procedure",
                             "Condition")]}]}
        if path == "Flag":  # the once-per-run check for Flags of ours: none
            return {"resourceType": "Bundle", "type": "searchset", "entry": []}
        raise AssertionError("no HTTP in the CPU benchmark")

    def search(self, *args, **kwargs):
        return iter(())  # no Flags of ours on the (absent) server


def pages(n: int, page_size: int, normal_only: bool) -> list[str]:
    resources = list(patients_and_observations(n))
    if normal_only:
        for r in resources:
            if r["resourceType"] == "Observation":
                r["valueQuantity"] = {"value": 3.2, "unit": "10*3/uL", "system": "http://unitsofmeasure.org",
                                      "code": "10*3/uL"}
    texts, entries = [], []
    for resource in resources:
        # A page ends only before a Patient, so each page carries the Patients of its Observations (_include).
        if resource["resourceType"] == "Patient" and len(entries) >= page_size:
            texts.append(json.dumps({"resourceType": "Bundle", "type": "searchset", "entry": entries}))
            entries = []
        entries.append({"resource": resource, "search": {"mode": "match" if resource["resourceType"] == "Observation"
                                                          else "include"}})
    if entries:
        texts.append(json.dumps({"resourceType": "Bundle", "type": "searchset", "entry": entries}))
    return texts


def measure(texts: list[str], profile: bool) -> tuple[float, int]:
    config = config_module.load(None)
    output = Output(system_base=config.output.system_base, profile="clinical")
    run = Run(config, mappings.load(), NoClient(), State(sqlite3.connect(":memory:", isolation_level=None)),
              DryRunSink(), output)
    profiler = cProfile.Profile() if profile else None
    started = time.process_time()
    if profiler:
        profiler.enable()
    count = 0
    for text in texts:
        bundle = json.loads(text)
        observations, patients = [], {}
        for entry in bundle["entry"]:
            resource = entry["resource"]
            if resource["resourceType"] == "Patient":
                patients[resource["id"]] = extract.patient(resource)
            else:
                observations.append(resource)
        run.patients.add(patients)
        run._process(observations, retry=False)
        count += len(observations)
    elapsed = time.process_time() - started
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    return elapsed, count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--page-size", type=int, default=200)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    for normal_only in (True, False):
        elapsed, count = measure(pages(args.n, args.page_size, normal_only), args.profile)
        label = "normal observations only" if normal_only else "mixed (about 30 % abnormal)"
        print(f"{label:<30} {count:>7,} observations  {1e6 * elapsed / count:7.1f} µs CPU each")


if __name__ == "__main__":
    main()
