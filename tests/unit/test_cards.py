"""CDS Hooks cards from a patient's resources (CONTRACT §8). Pure: resources and "now" in, cards out."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter import mappings
from adapter.config import ContextConfig
from adapter.outputs.cards import ATC, SNOMED, PatientRecords, Rules, chemotherapy_orders, order_sign, patient_view
from builders import anc, patient
from context_builders import (DUFFY_CODE, DUFFY_SYSTEM, RXNORM, duffy_null_marker, medication,
                              medication_administration, temperature)

MAPPINGS = mappings.load()
CLINICAL = Rules(mappings=MAPPINGS)
CTCAE = Rules(mappings=MAPPINGS, profile="ctcae-v5")
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)


def at(**ago: float) -> str:
    return (NOW - timedelta(**ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def records(*counts: dict, patient_id: str = "p1", birth_date: str | None = "1970-01-01") -> PatientRecords:
    return PatientRecords(patient_id=patient_id, patient=patient(patient_id, birth_date), observations=counts)


def order(system: str = ATC, code: str = "L01XA01", text: str | None = "cisplatin 75 mg/m2") -> dict:
    concept = {"coding": [{"system": system, "code": code}], **({"text": text} if text else {})}
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {
        "resourceType": "MedicationRequest", "id": "d1", "status": "draft", "intent": "order",
        "medicationCodeableConcept": concept}}]}


@pytest.mark.parametrize("value,rules,indicator,label", [
    (0.1, CLINICAL, "critical", "Severe neutropenia"),
    (0.499, CLINICAL, "critical", "Severe neutropenia"),
    (0.5, CLINICAL, "warning", "Moderate neutropenia"),
    (0.999, CLINICAL, "warning", "Moderate neutropenia"),
    (1.0, CLINICAL, "info", "Mild neutropenia"),
    (1.499, CLINICAL, "info", "Mild neutropenia"),
    (0.3, CTCAE, "critical", "Neutrophil count decreased, CTCAE v5 grade 4"),
    (0.7, CTCAE, "warning", "Neutrophil count decreased, CTCAE v5 grade 3"),
    (1.2, CTCAE, "info", "Neutrophil count decreased, CTCAE v5 grade 2"),
    (1.8, CTCAE, "info", "Neutrophil count decreased, CTCAE v5 grade 1"),
])
def test_indicator_and_summary_follow_the_grade_of_the_latest_count(value, rules, indicator, label):
    cards = patient_view(records(anc("o1", "p1", value, effective=at(hours=2))), rules, NOW)
    assert [c["indicator"] for c in cards] == [indicator]
    assert cards[0]["summary"].startswith(f"{label}: ANC ")
    assert len(cards[0]["summary"]) < 140


@pytest.mark.parametrize("value,rules", [(1.5, CLINICAL), (9.0, CLINICAL), (2.0, CTCAE)])
def test_no_card_for_a_normal_latest_count(value, rules):
    assert patient_view(records(anc("o0", "p1", 0.2, effective=at(days=3)),
                                anc("o1", "p1", value, effective=at(hours=2))), rules, NOW) == []


def test_no_card_without_counts():
    assert patient_view(records(), CLINICAL, NOW) == []


def test_the_latest_count_is_by_effective_time_not_by_order_received():
    cards = patient_view(records(anc("new", "p1", 0.8, effective=at(hours=1)),
                                 anc("old", "p1", 0.2, effective=at(days=2))), CLINICAL, NOW)
    assert cards[0]["indicator"] == "warning"


def test_counts_of_another_patient_are_ignored():
    cards = patient_view(records(anc("mine", "p1", 2.5, effective=at(days=1)),
                                 anc("theirs", "p2", 0.1, effective=at(hours=1))), CLINICAL, NOW)
    assert cards == []


def test_a_prefetched_patient_that_is_someone_else_gives_no_age():
    # An infant's 1200 is normal; graded by a stranger's birth date it could not be. Age unknown: adult.
    mismatched = PatientRecords(patient_id="p1", patient=patient("p9", "2026-06-01"),
                                observations=(anc("o1", "p1", 1.2, effective=at(hours=1)),))
    card = patient_view(mismatched, CLINICAL, NOW)[0]
    assert card["indicator"] == "info" and "age unknown" in card["detail"]


def test_infant_thresholds_are_used_and_named():
    infant = records(anc("o1", "p1", 1.2, effective=at(hours=1)), birth_date="2026-06-01")
    assert patient_view(infant, CLINICAL, NOW) == []
    card = patient_view(records(anc("o1", "p1", 0.8, effective=at(hours=1)), birth_date="2026-06-01"),
                        CLINICAL, NOW)[0]
    assert "infant thresholds" in card["detail"] and "mild" not in card["detail"].split("Rule:")[1]


def test_at_least_when_a_comparator_leaves_the_grade_open():
    card = patient_view(records(anc("o1", "p1", 1.0, comparator="<", effective=at(hours=1))), CLINICAL, NOW)[0]
    assert card["summary"].startswith("At least moderate neutropenia: ANC <1000 cells/µL")


def test_ungradable_counts_are_counted_by_reason_not_shown():
    card = patient_view(records(anc("o1", "p1", 0.3, effective=at(hours=1)),
                                anc("o2", "p1", 7, unit="furlongs", effective=at(minutes=30))), CLINICAL, NOW)[0]
    assert card["indicator"] == "critical"
    assert "1 count(s) could not be graded" in card["detail"] and "unknown-unit" in card["detail"]


def test_ctcae_rule_names_the_lln_and_its_source():
    lab_range = anc("o1", "p1", 1.8, effective=at(hours=1),
                    referenceRange=[{"low": {"value": 1.9, "unit": "10*3/uL", "system": "http://unitsofmeasure.org",
                                             "code": "10*3/uL"}}])
    card = patient_view(records(lab_range), CTCAE, NOW)[0]
    assert "1900 cells/µL (the lab's reference range)" in card["detail"]
    assert card["source"]["label"] == "anc-adapter (CTCAE v5 profile)"


def test_detail_shows_at_most_five_counts_newest_first():
    counts = [anc(f"o{i}", "p1", 0.3 + i / 10, effective=at(days=i)) for i in range(8)]
    detail = patient_view(records(*counts), CLINICAL, NOW)[0]["detail"]
    shown = [line for line in detail.splitlines() if line.startswith("| 2026")]
    assert len(shown) == 5 and shown[0].split("|")[2].strip() == "300"


@given(st.floats(min_value=0, max_value=5000), st.sampled_from(["<", "<=", ""]))
@settings(max_examples=200, deadline=None)
def test_summary_is_always_under_140_characters(value, comparator):
    observation = anc("o1", "p1", value, unit="/uL", comparator=comparator or None, effective=at(hours=1))
    for card in patient_view(records(observation), CLINICAL, NOW):
        assert len(card["summary"]) < 140


# --- order-sign -----------------------------------------------------------------------------------------

def test_order_sign_abnormal_recent_count():
    cards = order_sign(records(anc("o1", "p1", 0.3, effective=at(days=1))), order(), CLINICAL, NOW)
    assert [c["indicator"] for c in cards] == ["warning"]
    assert cards[0]["summary"].startswith("Chemotherapy order: latest ANC 300 cells/µL (severe neutropenia)")
    assert "cisplatin 75 mg/m2" in cards[0]["detail"]


@pytest.mark.parametrize("counts", [(), (anc("o1", "p1", 2.5, effective=at(days=7, minutes=1)),)])
def test_order_sign_no_recent_count(counts):
    cards = order_sign(records(*counts), order(), CLINICAL, NOW)
    assert [c["summary"] for c in cards] == ["Chemotherapy order: no ANC in the last 7 days"]


def test_order_sign_window_is_configurable():
    rules = Rules(mappings=MAPPINGS, order_sign_recent=timedelta(hours=36))
    cards = order_sign(records(anc("o1", "p1", 2.5, effective=at(hours=40))), order(), rules, NOW)
    assert cards[0]["summary"] == "Chemotherapy order: no ANC in the last 36 hours"


def test_order_sign_recent_normal_count_no_card():
    assert order_sign(records(anc("o1", "p1", 2.5, effective=at(days=6, hours=23))), order(), CLINICAL, NOW) == []


@pytest.mark.parametrize("draft,expected", [
    (order(ATC, "L01XA01"), ["cisplatin 75 mg/m2"]),
    (order(ATC, "L01", text=None), ["a chemotherapy order"]),
    (order(ATC, "N02BE01"), []),
    (order("http://www.nlm.nih.gov/research/umls/rxnorm", "L01XA01"), []),  # a code is only a code in its system
    ({"resourceType": "Bundle", "entry": [{"resource": {
        "resourceType": "MedicationRequest", "medicationReference": {"reference": "#med"},
        "contained": [{"resourceType": "Medication", "id": "med",
                       "code": {"coding": [{"system": ATC, "code": "L01BA01", "display": "methotrexate"}]}}]}}]},
     ["methotrexate"]),
    ({"resourceType": "Bundle", "entry": [{"resource": {
        "resourceType": "ServiceRequest", "code": {"coding": [{"system": SNOMED, "code": "367336001"}],
                                                   "text": "Chemotherapy"}}}]}, ["Chemotherapy"]),
    ({"resourceType": "Bundle", "entry": "not a list"}, []),
])
def test_chemotherapy_orders_in_draft_orders(draft, expected):
    assert chemotherapy_orders(draft, CLINICAL.chemotherapy) == expected


def test_order_sign_without_chemotherapy_says_nothing_even_when_severe():
    assert order_sign(records(anc("o1", "p1", 0.1, effective=at(hours=1))), order(ATC, "N02BE01"), CLINICAL, NOW) == []


# --- clinical context: the same assessment core as `run` (CONTRACT §5b, §8) -------------------------------

def context_records(*counts: dict, chemotherapy: tuple = (), conditions: tuple = (), temperatures: tuple = (),
                    patient_id: str = "p1") -> PatientRecords:
    return PatientRecords(patient_id=patient_id, patient=patient(patient_id, "1970-01-01"),
                          observations=(*counts, *temperatures), chemotherapy=chemotherapy, conditions=conditions)


def test_febrile_neutropenia_makes_a_critical_card_led_by_it():
    cards = patient_view(context_records(anc("o1", "p1", 0.32, effective=at(hours=4)),
                                         temperatures=(temperature("t1", "p1", 38.5, at(hours=2)),)), CLINICAL, NOW)
    assert [c["indicator"] for c in cards] == ["critical"]
    summary = cards[0]["summary"]
    assert summary.startswith("Febrile neutropenia: 38.5 °C with severe neutropenia: ANC 320 cells/µL")
    assert len(summary) < 140
    assert f"temperature 38.5 °C at {at(hours=2)[:10]} {at(hours=2)[11:16]} UTC" in cards[0]["detail"]
    assert "Febrile neutropenia (IDSA): one temperature ≥ 38.3 °C" in cards[0]["detail"]


def test_a_moderate_count_with_a_fever_is_critical_only_when_projected_below_500():
    # 900 then 600 twelve hours later: the same ratio per hour crosses 500 within 48 h -> febrile.
    falling = (anc("o0", "p1", 0.9, effective=at(hours=16)), anc("o1", "p1", 0.6, effective=at(hours=4)))
    fever = (temperature("t1", "p1", 38.4, at(hours=3)),)
    card = patient_view(context_records(*falling, temperatures=fever), CLINICAL, NOW)[0]
    assert card["indicator"] == "critical" and card["summary"].startswith("Febrile neutropenia: 38.4 °C with moderate")
    assert "Projected to fall below 500 cells/µL by " in card["detail"]
    # A steady 600 with the same fever: moderate, no projection, not febrile.
    steady = patient_view(context_records(anc("o1", "p1", 0.6, effective=at(hours=4)), temperatures=fever),
                          CLINICAL, NOW)[0]
    assert steady["indicator"] == "warning" and "Febrile" not in steady["summary"] + steady["detail"]
    assert "Projected" not in steady["detail"]


def test_a_fever_in_fahrenheit_is_said_in_celsius_and_as_recorded():
    card = patient_view(context_records(anc("o1", "p1", 0.2, effective=at(hours=4)),
                                        temperatures=(temperature("t1", "p1", 101.5, at(hours=5), unit="[degF]"),)),
                        CLINICAL, NOW)[0]
    assert "temperature 38.6 °C (101.5 °F as recorded)" in card["detail"]


def test_a_sustained_fever_below_38_3_never_reads_38_3_in_the_summary():
    # 100.9 °F (38.28 °C) then 100.6 °F over an hour: febrile by the sustained rule only. The summary
    # must not say "38.3 °C", which reads as the single-reading rule.
    fever = (temperature("t1", "p1", 100.9, at(hours=3), unit="[degF]"),
             temperature("t2", "p1", 100.6, at(hours=2), unit="[degF]"))
    card = patient_view(context_records(anc("o1", "p1", 0.2, effective=at(hours=4)), temperatures=fever),
                        CLINICAL, NOW)[0]
    assert card["summary"].startswith("Febrile neutropenia: 38.2 °C sustained"), card["summary"]


def test_a_temperature_in_an_unknown_unit_is_never_used_and_is_counted():
    card = patient_view(context_records(anc("o1", "p1", 0.2, effective=at(hours=4)),
                                        temperatures=(temperature("t1", "p1", 39, at(hours=3), unit="degrees"),)),
                        CLINICAL, NOW)[0]
    assert "Febrile" not in card["summary"]
    assert "1 temperature(s) could not be read and are not used (unknown-unit)" in card["detail"]


def test_another_patients_fever_is_ignored():
    card = patient_view(context_records(anc("o1", "p1", 0.2, effective=at(hours=4)),
                                        temperatures=(temperature("t1", "p2", 39.5, at(hours=3)),)), CLINICAL, NOW)[0]
    assert not card["summary"].startswith("Febrile")


def test_chemotherapy_by_medication_reference_is_in_the_detail():
    records_ = context_records(
        anc("o1", "p1", 0.8, effective="2026-11-20T08:00:00Z"),
        chemotherapy=(medication_administration("ma1", "p1", "2026-11-10T09:00:00Z", medication_id="m1"),
                      medication("m1", {"coding": [{"system": RXNORM, "code": "3002", "display": "cyclophosphamide"}]})))
    card = patient_view(records_, CLINICAL, NOW)[0]
    assert "After chemotherapy: cyclophosphamide on 2026-11-10 (9 days before this count)." in card["detail"]


@pytest.mark.parametrize("value,indicator,usual", [(1.209, "info", "info"), (1.3, None, "info"),
                                                   (0.9, "warning", "warning")])
def test_a_site_marked_duffy_null_patient_is_graded_against_the_floor(value, indicator, usual):
    site = dataclasses.replace(MAPPINGS, context=dataclasses.replace(
        MAPPINGS.context, duffy_null_codes=frozenset({(DUFFY_SYSTEM, DUFFY_CODE)})))
    marked = context_records(anc("o1", "p1", value, effective=at(hours=4)),
                             conditions=(duffy_null_marker("c1", "p1"),))
    cards = patient_view(marked, Rules(mappings=site), NOW)
    assert [c["indicator"] for c in cards] == ([indicator] if indicator else [])
    if cards:
        assert "Site-marked Duffy-null threshold: normal from 1210 cells/µL" in cards[0]["detail"]
        assert "with the site-marked Duffy-null threshold" in cards[0]["detail"] and "mild < 1210" in cards[0]["detail"]
    # Unmarked (no Condition), or the switch off: the usual adult bounds (1300 is mild).
    assert [c["indicator"] for c in patient_view(context_records(anc("o1", "p1", 1.3, effective=at(hours=4))),
                                                 Rules(mappings=site), NOW)] == ["info"]
    off = Rules(mappings=site, context=ContextConfig(duffy_null=False))
    assert [c["indicator"] for c in patient_view(marked, off, NOW)] == [usual]


def test_the_febrile_switch_off_leaves_the_grade():
    off = Rules(mappings=MAPPINGS, context=ContextConfig(febrile=False))
    cards = patient_view(context_records(anc("o1", "p1", 0.6, effective=at(hours=4)),
                                         temperatures=(temperature("t1", "p1", 39.0, at(hours=2)),)), off, NOW)
    assert [c["indicator"] for c in cards] == ["warning"]


@pytest.mark.parametrize("code,expected", [("3002", True), ("3639", True), ("1719", False)])
def test_chemotherapy_codes_come_from_mappings_context_toml(code, expected):
    assert bool(chemotherapy_orders(order(RXNORM, code, text="drug"), CLINICAL.chemotherapy)) is expected
    assert (code in MAPPINGS.context.rxnorm) is expected


def test_order_sign_for_an_rxnorm_chemotherapy_order_with_an_abnormal_count():
    cards = order_sign(records(anc("o1", "p1", 0.9, effective=at(days=1))),
                       order(RXNORM, "3002", text="cyclophosphamide 750 mg/m2"), CLINICAL, NOW)
    assert [c["indicator"] for c in cards] == ["warning"]
    assert "cyclophosphamide 750 mg/m2" in cards[0]["detail"]
