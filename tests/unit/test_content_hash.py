"""Content hashes decide whether a resource is sent again. Their form changed (orjson, issue 13): a state
written with the earlier form must not make an upgraded adapter resend everything it wrote, nor keep
anything it should send."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from adapter import mappings, writeback
from adapter.clinical import classify
from adapter.clinical.assess import Rules, assess
from adapter.clinical.context import Context
from adapter.model import AgeBand, Classification, Count, Reading
from adapter.state import Written

THRESHOLDS = mappings.load().thresholds
RULES = Rules(profile="clinical", thresholds=THRESHOLDS)
OUTPUT = writeback.Output(system_base="https://hospital.example/fhir/anc-adapter", profile="clinical",
                          resources=("Flag", "RiskAssessment"))
START = datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)


def graded(observation_id: str, hours: float, anc: float):
    reading = Reading(observation_id, "1", "final", "p", START + timedelta(hours=hours), Count(anc, ""))
    result = classify.classify(reading.count, AgeBand.ADULT, "clinical", THRESHOLDS, 2000)
    assert isinstance(result, Classification)
    return reading, result


def first_plan(counts) -> list[writeback.Planned]:
    return writeback.plan_patient("p", assess(counts, Context(), RULES), {}, OUTPUT)


def as_stored(planned: writeback.Planned, content_hash: str) -> Written:
    return Written(planned.resource_type, planned.identifier, planned.patient_id, planned.status, content_hash,
                   f"id-{planned.identifier}", planned.evidence)


def stored_before_the_upgrade(planned: list[writeback.Planned]) -> dict[str, list[Written]]:
    """What an adapter of the earlier hash form recorded after the server accepted these writes."""
    previously: dict[str, list[Written]] = {}
    for p in planned:
        body = {k: v for k, v in p.resource.items() if k != "status"}
        previously.setdefault(p.resource_type, []).append(as_stored(p, writeback._legacy_hash(body)))
    return previously


def test_hashes_of_the_earlier_form_are_upgraded_without_sending_anything():
    counts = [graded("o1", 0, 420), graded("o2", 24, 800)]
    written = first_plan(counts)
    assert {p.resource_type for p in written} == {"Flag", "RiskAssessment"} and all(p.send for p in written)
    previously = stored_before_the_upgrade(written)
    assert all(len(w.content_hash) == 32 for ws in previously.values() for w in ws)

    again = writeback.plan_patient("p", assess(counts, Context(), RULES), previously, OUTPUT)

    assert len(again) == len(written) and not any(p.send for p in again)  # bookkeeping only
    assert {(p.resource_type, p.identifier, p.status) for p in again} == \
        {(p.resource_type, p.identifier, p.status) for p in written}  # no RiskAssessment became "amended"
    assert {p.content_hash for p in again} == {p.content_hash for p in written}
    upgraded: dict[str, list[Written]] = {}
    for p in again:
        upgraded.setdefault(p.resource_type, []).append(p.written(f"id-{p.identifier}"))
    assert writeback.plan_patient("p", assess(counts, Context(), RULES), upgraded, OUTPUT) == []


def test_a_change_is_sent_whatever_the_form_of_the_stored_hash():
    counts = [graded("o1", 0, 420)]
    previously = stored_before_the_upgrade(first_plan(counts))
    worse = [graded("o1", 0, 420), graded("o2", 24, 300)]  # the Flag's grade and text change

    planned = writeback.plan_patient("p", assess(worse, Context(), RULES), previously, OUTPUT)

    flag = next(p for p in planned if p.resource_type == "Flag")
    assert flag.send and flag.identifier == previously["Flag"][0].identifier
    assert flag.content_hash.startswith("h2:")


def test_an_adopted_flag_without_a_hash_is_written_again():
    [flag] = [p for p in first_plan([graded("o1", 0, 420)]) if p.resource_type == "Flag"]
    adopted = {"Flag": [as_stored(flag, "")]}

    [again] = [p for p in writeback.plan_patient("p", assess([graded("o1", 0, 420)], Context(), RULES), adopted,
                                                  OUTPUT) if p.resource_type == "Flag"]

    assert again.send and again.server_id == f"id-{flag.identifier}"
