"""--metrics-file: Prometheus text format for the node_exporter textfile collector, written atomically
(temporary file + rename, by prometheus_client) at the end of every run, failed runs included."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from adapter.state import State

OUTCOMES = ("observations_read", "already_processed", "quarantined", "withdrawn", "ignored", "malformed",
            "created", "updated", "unchanged", "evidence_deleted")


def write(path: Path, state: State, summary: dict[str, Any], exit_code: int, http: dict[str, int]) -> None:
    registry = CollectorRegistry()

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=registry)

    gauge("anc_adapter_last_run_exit_code", "Exit code of the last run (docs/operations.md: exit codes)").set(exit_code)
    gauge("anc_adapter_last_run_duration_seconds", "Duration of the last run").set(summary.get("duration_s", 0))
    for name, doc, iso in (
        ("anc_adapter_last_success_timestamp_seconds", "End of the last run that exited 0", state.last_success()),
        ("anc_adapter_watermark_timestamp_seconds", "The live watermark (server clock)", state.watermark()),
    ):
        if iso:
            gauge(name, doc).set(datetime.fromisoformat(iso).timestamp())
    resume = state.resume_point()
    if resume:  # a pass stopped early, not finished yet: how far it has got (server clock)
        gauge("anc_adapter_resume_point_timestamp_seconds",
              "Where the next run goes on, while a pass stopped early is not finished").set(
            datetime.fromisoformat(resume.resume_at).timestamp())
    gauge("anc_adapter_quarantine_size", "Observations in quarantine now").set(len(state.quarantined()))
    gauge("anc_adapter_write_failures", "Patients whose writes the server refused, retried every run").set(
        len(state.write_failures()))
    gauge("anc_adapter_last_run_complete",
          "1 when the last run read every page (the watermark can move), 0 when it stopped early").set(
        1 if summary.get("complete") else 0)
    observations = gauge("anc_adapter_last_run_observations",
                         "Observations, and resources written, in the last run by outcome", ("outcome",))
    for outcome in OUTCOMES:
        observations.labels(outcome=outcome).set(summary.get(outcome, 0))
    for key, doc in (("evidence_checked", "Observations behind live Flags / RiskAssessments checked for deletion"),
                     ("evidence_requests", "HTTP requests the deletion check took in the last run")):
        gauge(f"anc_adapter_last_run_{key}", doc).set(summary.get(key, 0))
    graded = gauge("anc_adapter_last_run_graded", "Observations graded in the last run by grade", ("grade",))
    for grade, count in (summary.get("classified") or {}).items():
        graded.labels(grade=grade).set(count)
    requests = gauge("anc_adapter_last_run_http_requests", "HTTP requests in the last run by status", ("status",))
    for status, count in sorted(http.items()):
        requests.labels(status=status).set(count)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
