"""`anc-adapter demo`: the main job on an embedded default — a local FHIR server, sample patients, one
run, a table of results read back from the server."""

from __future__ import annotations

import tempfile
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TextIO

import requests

from adapter.localserver import sekmet

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"

# patient id, birthDate, ANC value, unit, what it shows. Names are synthetic.
SAMPLES: tuple[tuple[str, str | None, float, str, str], ...] = (
    ("demo-adult-normal", "1971-03-02", 2.5, "10*3/uL", "adult, normal"),
    ("demo-adult-mild", "1958-07-14", 1.2, "10*3/uL", "adult, mild"),
    ("demo-adult-moderate", "1990-01-30", 800, "/uL", "adult, moderate"),
    ("demo-adult-severe", "1949-11-05", 0.32, "10*9/L", "adult, severe"),
    ("demo-child-mild", "2020-05-20", 1.3, "K/uL", "child 6 y, mild (lab alias K/uL)"),
    ("demo-infant-normal", "AGE_6_MONTHS", 1.2, "10*3/uL", "infant, 1200 is normal under 1 year"),
    ("demo-unknown-unit", "1980-02-02", 1.1, "mmol/L", "unknown unit: quarantined, not guessed"),
    ("demo-febrile", "1962-04-18", 0.25, "10*3/uL", "severe, fever 2 h later, 10 d after chemotherapy"),
)
# The go-live review part of the demo: one more patient's history (10*3/uL, days before today), graded by
# a dry run over the past weeks. A fall to severe that recovers (episode 1: its Flag would be inactive),
# then a new mild fall (episode 2: active), so the report shows a timeline.
COURSE_PATIENT, COURSE_BORN = "demo-chemo-course", "1962-04-09"
COURSE: tuple[tuple[int, float], ...] = (
    (27, 4.1), (20, 2.2), (16, 1.1), (13, 0.42), (10, 0.28), (7, 0.9), (4, 1.8), (1, 1.3),
)

FEBRILE = "demo-febrile"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def _febrile_context(patient_id: str, count_time: datetime) -> list[dict[str, Any]]:
    """What makes the febrile sample febrile neutropenia after chemotherapy: a body temperature (LOINC
    8310-5) of 38.6 °C two hours after the count and a cyclophosphamide infusion ten days before it."""
    def instant(moment: datetime) -> str:
        return moment.isoformat().replace("+00:00", "Z")

    return [
        {"resourceType": "Observation", "id": f"temp-{patient_id}", "status": "final",
         "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                   "code": "vital-signs"}]}],
         "code": {"coding": [{"system": LOINC, "code": "8310-5", "display": "Body temperature"}]},
         "subject": {"reference": f"Patient/{patient_id}"},
         "effectiveDateTime": instant(count_time + timedelta(hours=2)),
         "valueQuantity": {"value": 38.6, "unit": "°C", "system": UCUM, "code": "Cel"}},
        {"resourceType": "MedicationAdministration", "id": f"chemo-{patient_id}", "status": "completed",
         "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "3002",
                                                   "display": "cyclophosphamide"}]},
         "subject": {"reference": f"Patient/{patient_id}"},
         "effectiveDateTime": instant(count_time - timedelta(days=10))},
    ]


def sample_bundle(today: date) -> dict[str, Any]:
    entries = []
    effective = datetime.combine(today - timedelta(days=1), datetime.min.time(), timezone.utc) + timedelta(hours=8)
    for number, (patient_id, born, value, unit, _) in enumerate(SAMPLES, start=1):
        birth = (today - timedelta(days=182)).isoformat() if born == "AGE_6_MONTHS" else born
        patient = {
            "resourceType": "Patient", "id": patient_id,
            "name": [{"family": f"Sample{number}", "given": ["Demo"]}], "birthDate": birth,
        }
        quantity: dict[str, Any] = {"value": value, "unit": unit}
        if unit.startswith(("10*", "/")):
            quantity.update(system=UCUM, code=unit)
        observation = {
            "resourceType": "Observation", "id": f"anc-{patient_id}", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "laboratory"}]}],
            "code": {"coding": [{"system": LOINC, "code": "751-8",
                                 "display": "Neutrophils [#/volume] in Blood by Automated count"}]},
            "subject": {"reference": f"Patient/{patient_id}"},
            "effectiveDateTime": effective.isoformat().replace("+00:00", "Z"),
            "valueQuantity": quantity,
        }
        context = _febrile_context(patient_id, effective) if patient_id == FEBRILE else []
        for resource in (patient, observation, *context):
            entries.append({
                "resource": resource,
                "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"},
            })
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def course_bundle(today: date) -> dict[str, Any]:
    morning = datetime.combine(today, datetime.min.time(), timezone.utc) + timedelta(hours=8)
    resources: list[dict[str, Any]] = [{
        "resourceType": "Patient", "id": COURSE_PATIENT, "birthDate": COURSE_BORN,
        "name": [{"family": f"Sample{len(SAMPLES) + 1}", "given": ["Demo"]}],
    }]
    for number, (days_before, value) in enumerate(COURSE, start=1):
        resources.append({
            "resourceType": "Observation", "id": f"anc-{COURSE_PATIENT}-{number}", "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "751-8"}]},
            "subject": {"reference": f"Patient/{COURSE_PATIENT}"},
            "effectiveDateTime": (morning - timedelta(days=days_before)).isoformat().replace("+00:00", "Z"),
            "valueQuantity": {"value": value, "unit": "10*3/uL", "system": UCUM, "code": "10*3/uL"},
        })
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources
    ]}


def load(base_url: str, bundle: dict[str, Any]) -> None:
    response = requests.post(base_url, json=bundle, timeout=60,
                             headers={"Content-Type": "application/fhir+json"})
    response.raise_for_status()


def main(out: TextIO, run_once: Any, tag_system: str, write_report: Any = None) -> int:
    """`run_once(base_url, state_path, dry_run=False, since=None)` runs one pass and returns (exit code,
    summary); `write_report(state_path, target)` writes the review report of that state's last dry run
    and returns how many patients it shows as flagged."""
    out.write("Starting the local FHIR server (Sekmet, loopback, in-memory) ...\n")
    with sekmet() as base_url, tempfile.TemporaryDirectory(prefix="anc-demo-") as workdir:
        load(base_url, sample_bundle(datetime.now(timezone.utc).date()))
        out.write(f"Loaded {len(SAMPLES)} sample patients with one ANC each into {base_url}\n\n")
        state_path = Path(workdir, "state.sqlite3")
        code, summary = run_once(base_url, state_path)
        flags = _our_flags(base_url, tag_system)
        _table(out, summary.rows if summary else [], flags)
        if summary:
            out.write("\nRun summary: " + ", ".join(f"{k}={v}" for k, v in summary.as_dict().items()) + "\n")
        out.write(f"Flags on the server with our tag, read back: {len(flags)}\n")
        if FEBRILE in flags:
            out.write(f"\nThe febrile sample's Flag says (priority "
                      f"{_priority(flags[FEBRILE])}):\n  {flags[FEBRILE]['code']['text']}\n\n")
        if code != 0:
            return code
        code, again = run_once(base_url, state_path)
        if again:
            out.write(f"Second run (idempotence): read={again.observations_read} created={again.created} "
                      f"updated={again.updated}; Flags on the server: {len(_our_flags(base_url, tag_system))}\n")
        if write_report is not None and code == 0:
            code = _review(out, base_url, state_path, run_once, write_report, tag_system)
        return code


def _review(out: TextIO, base_url: str, state_path: Path, run_once: Any, write_report: Any,
            tag_system: str) -> int:
    """The go-live review (docs/review-report.md): a dry run over past weeks, then the report."""
    today = datetime.now(timezone.utc).date()
    load(base_url, course_bundle(today))
    since = datetime.combine(today - timedelta(days=28), datetime.min.time(), timezone.utc)
    code, review = run_once(base_url, state_path, dry_run=True, since=since)
    if code != 0 or review is None:
        return code
    out.write(f"\nGo-live review: one more patient with {len(COURSE)} counts over four weeks loaded; "
              f"`run --dry-run --since {since.date()}` graded them and sent nothing (it would create "
              f"{review.created} and update {review.updated}); Flags on the server: "
              f"{len(_our_flags(base_url, tag_system))}\n")
    # Kept after the demo (the server and the state are gone by then): a new private directory each time.
    target = Path(tempfile.mkdtemp(prefix="anc-demo-report-"), "review.html")
    flagged = write_report(state_path, target)
    out.write(f"Review report ({flagged} flagged patients; synthetic here, but a real report holds patient "
              f"data): {target}\nOpen it in a browser: file://{target}\n")
    return code


def _priority(flag: dict[str, Any]) -> str:
    return next((e["valueCodeableConcept"]["coding"][0]["code"] for e in flag.get("extension", [])
                 if e.get("url", "").endswith("/flag-priority")), "-")


def _our_flags(base_url: str, tag_system: str) -> dict[str, dict[str, Any]]:
    params = {"_count": 100, "_tag": f"{tag_system}|anc-adapter"}
    bundle = requests.get(f"{base_url}/Flag", params=params, timeout=30).json()
    flags = {}
    for entry in bundle.get("entry", []):
        flag = entry["resource"]
        patient_id = flag["subject"]["reference"].split("/")[-1]
        flags[patient_id] = flag
    return flags


def _table(out: TextIO, rows: list[dict[str, Any]], flags: dict[str, dict[str, Any]]) -> None:
    by_patient = {row["patient_id"]: row for row in rows}
    header = f"{'patient':<22} {'ANC cells/µL':>13}  {'grade':<26} {'written to the server':<48}  sample"
    out.write(header + "\n" + "-" * len(header) + "\n")
    for patient_id, _, _, _, what in SAMPLES:
        row = by_patient.get(patient_id)
        flag = flags.get(patient_id)
        written = f"Flag/{flag['id']} {flag['status']}" if flag else "-"
        if row is None:
            out.write(f"{patient_id:<22} {'-':>13}  {'quarantined':<26} {written:<48}  {what}\n")
            continue
        grade = row["grade"] + (" (age band " + row["age_band"] + ")" if row["age_band"] != "adult" else "")
        out.write(f"{patient_id:<22} {row['anc_per_ul']:>13}  {grade:<26} {written:<48}  {what}\n")
