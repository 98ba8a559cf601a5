"""Bulk backfill measurements (README "Bulk backfill").

    .venv/bin/python bench/bulk.py compare --n 10000
        On Sekmet: the same N ANC Observations (with their Patients) on two copies of one database;
        `run --since` (paged search) on one, `run --bulk --since` on the other; wall time, requests,
        CPU, peak RSS and the Flags written, each adapter run a subprocess of its own (wait4).

    .venv/bin/python bench/bulk.py memory --sizes 10000 50000
        Peak RSS of `run --bulk` against a small stand-in export server (in this process) that generates
        the NDJSON files on the fly and accepts the writes: memory must stay flat in the file size."""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataset import patients_and_observations  # noqa: E402
from run import copy_database, load, run_child  # noqa: E402

from adapter.localserver import sekmet  # noqa: E402

SINCE = "2020-01-01T00:00:00Z"


def adapter(base_url: str, workdir: Path, *args: str) -> dict:
    config = workdir / "adapter.toml"
    config.write_text(f'[fhir]\nbase_url = "{base_url}"\ntimeout_s = 600\n'
                      f'[state]\npath = "{workdir / "state.sqlite3"}"\n')
    result = run_child([sys.executable, "-m", "adapter", "run", "--config", str(config), "--log-format", "json",
                        *args])
    summaries = [json.loads(line) for line in result["stderr"].splitlines() if '"run-summary"' in line]
    if result["exit"] != 0 or not summaries:
        raise SystemExit(f"adapter run {args} failed ({result['exit']}):\n{result['stderr'][-3000:]}")
    result["summary"] = summaries[0]["summary"]
    return result


def flags(base_url: str) -> list[tuple]:
    found, url, params = [], f"{base_url}/Flag", {"_count": 1000}
    while url:
        bundle = requests.get(url, params=params, timeout=600).json()
        found += [(json.dumps(e["resource"]["identifier"]), e["resource"]["status"],
                   json.dumps(e["resource"]["code"], sort_keys=True), json.dumps(e["resource"].get("period")))
                  for e in bundle.get("entry", [])]
        url, params = next((l["url"] for l in bundle.get("link", []) if l["relation"] == "next"), None), None
    return sorted(found)


def compare(n: int) -> None:
    with tempfile.TemporaryDirectory(prefix=f"anc-bulk-{n}-") as tmp:
        workdir = Path(tmp)
        load_s = load(workdir / "base.sqlite3", n)
        results, written = {}, {}
        for name, args in (("paged", ("--since", SINCE)), ("bulk", ("--bulk", "--since", SINCE))):
            copy_database(workdir / "base.sqlite3", workdir / f"{name}.sqlite3")
            (workdir / name).mkdir()
            with sekmet(database=str(workdir / f"{name}.sqlite3")) as base_url:
                results[name] = adapter(base_url, workdir / name, *args)
                written[name] = flags(base_url)
    print(f"N = {n:,} ANC Observations ({n // 4:,} patients), loaded in {load_s:.0f} s; "
          f"same Flags written: {written['paged'] == written['bulk']} ({len(written['bulk']):,} Flags)")
    print(f"| {'':<24} | {'run --since (paged)':>20} | {'run --bulk':>12} |")
    print(f"|{'-' * 26}|{'-' * 22}|{'-' * 14}|")
    rows = [("wall time, s", "wall_s", "{:.1f}"), ("CPU, s", "cpu_s", "{:.1f}"), ("peak RSS, MB", "peak_rss_mb", "{:.1f}")]
    for label, key, fmt in rows:
        print(f"| {label:<24} | {fmt.format(results['paged'][key]):>20} | {fmt.format(results['bulk'][key]):>12} |")
    for label, key in (("HTTP requests", "http_requests"), ("observations read", "observations_read"),
                       ("Flags created", "created")):
        print(f"| {label:<24} | {results['paged']['summary'][key]:>20,} | {results['bulk']['summary'][key]:>12,} |")


# -- memory: a stand-in export server -------------------------------------------------------------------

CAPABILITY = {"resourceType": "CapabilityStatement", "rest": [{"mode": "server", "interaction": [
    {"code": "transaction"}], "resource": [{"type": "Flag", "conditionalUpdate": True}]}]}


def _generated(n: int, resource_type: str, patients: int) -> Iterator[bytes]:
    """The benchmark data set, its Observations spread over a fixed number of Patients, so that only
    the Observation file grows with n (the Patient lookup has its own bound)."""
    for resource in patients_and_observations(max(n, 4 * patients) if resource_type == "Patient" else n):
        if resource["resourceType"] != resource_type:
            continue
        if resource_type == "Patient" and int(resource["id"][2:]) >= patients:
            return
        if resource_type == "Observation":
            resource["subject"]["reference"] = f"Patient/bp{int(resource['id'][2:]) // 4 % patients}"
        resource["meta"] = {"versionId": "1", "lastUpdated": "2026-11-25T00:00:00Z"}
        yield json.dumps(resource, separators=(",", ":")).encode() + b"\n"


def stand_in(n: int, patients: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _json(self, body: dict, status: int = 200, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for key, value in {"Content-Type": "application/fhir+json", **(headers or {})}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            base = f"http://127.0.0.1:{self.server.server_port}/fhir"
            path = self.path.split("?")[0]
            if path == "/fhir/metadata":
                self._json(CAPABILITY)
            elif path == "/fhir/$export":
                self.send_response(202)
                self.send_header("Content-Location", f"{base}/status/1")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif path == "/fhir/status/1":
                self._json({"transactionTime": "2026-11-25T00:00:00Z", "request": f"{base}/$export",
                            "requiresAccessToken": False, "error": [],
                            "output": [{"type": t, "url": f"{base}/files/{t}.ndjson"}
                                       for t in ("Observation", "Patient")]})
            elif match := re.fullmatch(r"/fhir/files/(\w+)\.ndjson", path):
                # Generated while sent, without Content-Length (HTTP/1.0: the end is the close), so the
                # client cannot learn the size up front and must stream.
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+ndjson")
                self.end_headers()
                for line in _generated(n, match.group(1), patients):
                    self.wfile.write(line)
            elif path == "/fhir/Flag":
                self._json({"resourceType": "Bundle", "type": "searchset", "entry": []})
            else:
                self._json({"resourceType": "OperationOutcome"}, 404)

        def do_POST(self) -> None:
            bundle = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self._json({"resourceType": "Bundle", "type": "transaction-response", "entry": [
                {"response": {"status": "201 Created", "location": f"Flag/f{i}/_history/1"}}
                for i, _ in enumerate(bundle["entry"])]})

        def do_DELETE(self) -> None:
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def memory(sizes: list[int], patients: int) -> None:
    print(f"{patients:,} Patients in the export whatever the number of Observations")
    print(f"| {'observations':>12} | {'NDJSON MB':>9} | {'peak RSS MB':>11} | {'wall s':>6} | {'created':>7} |")
    print(f"|{'-' * 14}|{'-' * 11}|{'-' * 13}|{'-' * 8}|{'-' * 9}|")
    for n in sizes:
        size_mb = sum(len(line) for line in _generated(n, "Observation", patients)) / 1e6
        server = stand_in(n, patients)
        try:
            with tempfile.TemporaryDirectory(prefix=f"anc-bulk-mem-{n}-") as tmp:
                result = adapter(f"http://127.0.0.1:{server.server_port}/fhir", Path(tmp), "--bulk")
        finally:
            server.shutdown()
        read = result["summary"]["observations_read"]
        assert read == n, f"read {read} of {n}"
        print(f"| {n:>12,} | {size_mb:>9.1f} | {result['peak_rss_mb']:>11.1f} | {result['wall_s']:>6.1f} | "
              f"{result['summary']['created']:>7,} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("compare").add_argument("--n", type=int, default=10_000)
    memory_command = commands.add_parser("memory")
    memory_command.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    memory_command.add_argument("--patients", type=int, default=2_500)
    args = parser.parse_args()
    if args.command == "compare":
        compare(args.n)
    else:
        memory(args.sizes, args.patients)


if __name__ == "__main__":
    main()
