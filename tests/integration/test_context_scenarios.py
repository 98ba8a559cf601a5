"""Issue 11 scenarios on the real local server: febrile neutropenia, projection, chemotherapy context,
site-marked Duffy-null thresholds and the Flag priority (CONTRACT §5b, §6), each rule at its edges.

Every count here is taken at COUNT_TIME (2026-11-20T08:00Z) unless said otherwise; other times are relative
to it. Several independent patients share one server where that keeps the file fast."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timedelta

import pytest

from adapter.cli import main
from builders import anc, patient
from context_builders import (ATC, COUNT_TIME, DUFFY_CODE, DUFFY_SYSTEM, RXNORM, SNOMED, at, atc,
                              chemotherapy_procedure, duffy_null_marker, medication, medication_administration,
                              medication_request, patient_with_race, site_mappings, temperature)

pytestmark = pytest.mark.integration

FLAG_DETAIL = "http://hl7.org/fhir/StructureDefinition/flag-detail"
FLAG_PRIORITY = "http://hl7.org/fhir/StructureDefinition/flag-priority"
PRIORITY_SYSTEM = "http://hl7.org/fhir/flag-priority-code"
FEBRILE = (SNOMED, "409089005")
NEUTROPENIA = (SNOMED, "165517008")
GRADE_SUFFIX = "/CodeSystem/neutropenia-grade"
DUFFY_TEXT = "site-marked Duffy-null threshold: normal from 1210 cells/µL"


class Adapter:
    """`anc-adapter run` against the test server, plus what `status` and `quarantine list` say."""

    def __init__(self, server, tmp_path, capsys):
        self.server, self.tmp_path, self.capsys = server, tmp_path, capsys
        self.config = tmp_path / "adapter.toml"
        self.state = str(tmp_path / "state.sqlite3")
        self.configure()

    def configure(self, *, profile: str = "clinical", duffy_codes: list[str] | None = None) -> None:
        text = f'[classify]\nprofile = "{profile}"\n[output]\nresources = ["Flag", "RiskAssessment"]\n'
        if duffy_codes is not None:
            text += f'[mappings]\npath = "{site_mappings(self.tmp_path, duffy_codes)}"\n'
        self.config.write_text(text)

    def run(self) -> None:
        assert main(["run", "--config", str(self.config), "--fhir-url", self.server.base_url,
                     "--state", self.state, "--log-format", "json"]) == 0

    def quarantined(self) -> dict[str, str]:
        """Observation id → reason, from `status --json`, checked against `quarantine list`."""
        self.capsys.readouterr()
        assert main(["status", "--json", "--config", str(self.config), "--state", self.state]) == 0
        from_status = {q["observation_id"]: q["reason"]
                       for q in json.loads(self.capsys.readouterr().out)["quarantine"]}
        assert main(["quarantine", "list", "--config", str(self.config), "--state", self.state]) == 0
        listed = [json.loads(line) for line in self.capsys.readouterr().out.splitlines() if line.strip()]
        assert {q["observation_id"]: q["reason"] for q in listed} == from_status
        return from_status


@pytest.fixture
def adapter(fhir_server, tmp_path, capsys):
    return Adapter(fhir_server, tmp_path, capsys)


# -- reading what we wrote --------------------------------------------------------------------------------

def live_flag(server, patient_id: str) -> dict:
    [flag] = [f for f in server.flags(patient_id) if f["status"] == "active"]
    return flag


def codings(resource: dict) -> set[tuple[str, str]]:
    return {(c["system"], c["code"]) for c in resource["code"]["coding"]}


def grade(resource: dict) -> str:
    return next(c["code"] for c in resource["code"]["coding"] if c["system"].endswith(GRADE_SUFFIX))


def is_febrile(flag: dict) -> bool:
    return FEBRILE in codings(flag)


def priority(flag: dict) -> str | None:
    values = [e["valueCodeableConcept"] for e in flag.get("extension", []) if e["url"] == FLAG_PRIORITY]
    if not values:
        return None
    [value] = values
    [coding] = [c for c in value["coding"] if c["system"] == PRIORITY_SYSTEM]
    return coding["code"]


def details(flag: dict) -> list[str]:
    return [e["valueReference"]["reference"] for e in flag.get("extension", []) if e["url"] == FLAG_DETAIL]


def risk_for(server, patient_id: str, observation_id: str) -> dict:
    [risk] = [r for r in server.risk_assessments(patient_id)
              if r["identifier"][0]["value"] == f"{patient_id}/{observation_id}"]
    return risk


def qualitative_risk(risk: dict) -> str:
    return risk["prediction"][0]["qualitativeRisk"]["coding"][0]["code"]


def basis(risk: dict) -> set[str]:
    return {b["reference"] for b in risk.get("basis", [])}


def assert_febrile(flag: dict, count_id: str, temperature_ids: set[str], count_grade: str = "severe") -> None:
    assert flag["status"] == "active"
    assert is_febrile(flag)
    assert NEUTROPENIA in codings(flag)
    assert grade(flag) == count_grade  # the grade coding stays the count's grade
    assert [c.get("display") for c in flag["code"]["coding"] if (c["system"], c["code"]) == FEBRILE] == [
        "Febrile neutropenia"]
    assert priority(flag) == "PH"
    assert flag["code"]["text"].startswith("Febrile neutropenia: ")
    assert details(flag)[0] == f"Observation/{count_id}"  # the count stays first
    assert {f"Observation/{t}" for t in temperature_ids} <= set(details(flag)[1:])


def assert_not_febrile(flag: dict, count_id: str, expected_priority: str = "PH") -> None:
    assert not is_febrile(flag)
    assert priority(flag) == expected_priority
    assert not flag["code"]["text"].startswith("Febrile")
    assert "temperature" not in flag["code"]["text"]
    assert details(flag) == [f"Observation/{count_id}"]


def severe_count(observation_id: str, patient_id: str, effective: str | None = None) -> dict:
    return anc(observation_id, patient_id, 0.32, effective=effective or at())


# -- febrile neutropenia: single reading ------------------------------------------------------------------

def test_one_temperature_of_38_3_is_a_fever_and_38_2_is_not(fhir_server, adapter):
    fhir_server.load(
        patient("hot"), severe_count("o-hot", "hot"), temperature("t-hot", "hot", 38.3, at(hours=2)),
        patient("warm"), severe_count("o-warm", "warm"), temperature("t-warm", "warm", 38.2, at(hours=2)),
    )
    adapter.run()

    hot = live_flag(fhir_server, "hot")
    assert_febrile(hot, "o-hot", {"t-hot"})
    assert hot["code"]["text"].startswith(
        "Febrile neutropenia: temperature 38.3 °C at 2026-11-20T10:00Z with severe neutropenia: "
        "ANC 320 cells/µL on 2026-11-20")
    risk = risk_for(fhir_server, "hot", "o-hot")
    assert qualitative_risk(risk) == "high"
    assert {"Observation/o-hot", "Observation/t-hot"} <= basis(risk)

    warm = live_flag(fhir_server, "warm")
    assert_not_febrile(warm, "o-warm")
    assert warm["code"]["text"].startswith("Severe neutropenia: ANC 320 cells/µL on 2026-11-20")
    assert "Observation/t-warm" not in basis(risk_for(fhir_server, "warm", "o-warm"))


# -- febrile neutropenia: sustained readings --------------------------------------------------------------

def test_readings_of_38_0_count_only_when_they_span_an_hour_without_a_dip(fhir_server, adapter):
    fhir_server.load(
        # 09:00 → 10:01, all ≥ 38.0: 61 minutes, a fever.
        patient("span61"), severe_count("o-61", "span61"),
        temperature("t61a", "span61", 38.0, at(hours=1)), temperature("t61b", "span61", 38.2, at(hours=1, minutes=30)),
        temperature("t61c", "span61", 38.0, at(hours=2, minutes=1)),
        # 09:00 → 09:59: 59 minutes, not yet.
        patient("span59"), severe_count("o-59", "span59"),
        temperature("t59a", "span59", 38.0, at(hours=1)), temperature("t59b", "span59", 38.2, at(hours=1, minutes=30)),
        temperature("t59c", "span59", 38.0, at(hours=1, minutes=59)),
        # 61 minutes end to end, but 37.9 in between breaks it.
        patient("dip"), severe_count("o-dip", "dip"),
        temperature("tdipa", "dip", 38.0, at(hours=1)), temperature("tdipb", "dip", 37.9, at(hours=1, minutes=30)),
        temperature("tdipc", "dip", 38.1, at(hours=2, minutes=1)),
    )
    adapter.run()

    sustained = live_flag(fhir_server, "span61")
    assert_febrile(sustained, "o-61", {"t61a", "t61c"})
    assert "temperature ≥ 38.0 °C from 2026-11-20T09:00Z to 2026-11-20T10:01Z" in sustained["code"]["text"]
    assert "ANC 320 cells/µL" in sustained["code"]["text"]
    assert {"Observation/t61a", "Observation/t61c"} <= basis(risk_for(fhir_server, "span61", "o-61"))

    assert_not_febrile(live_flag(fhir_server, "span59"), "o-59")
    assert_not_febrile(live_flag(fhir_server, "dip"), "o-dip")


def test_a_fever_counts_within_24_hours_either_side_of_the_count(fhir_server, adapter):
    offsets = {"before-23h": -23, "before-25h": -25, "after-23h": 23, "after-25h": 25}
    for pid, hours in offsets.items():
        fhir_server.load(patient(pid), severe_count(f"o-{pid}", pid),
                         temperature(f"t-{pid}", pid, 38.6, at(hours=hours)))
    adapter.run()

    for pid in ("before-23h", "after-23h"):
        assert_febrile(live_flag(fhir_server, pid), f"o-{pid}", {f"t-{pid}"})
    for pid in ("before-25h", "after-25h"):
        assert_not_febrile(live_flag(fhir_server, pid), f"o-{pid}")


# -- temperatures: units and plausibility -----------------------------------------------------------------

def test_fahrenheit_is_converted_before_the_rule_and_said_in_celsius(fhir_server, adapter):
    fhir_server.load(
        patient("f-hot"), severe_count("o-fh", "f-hot"),
        temperature("t-fh", "f-hot", 101.5, at(hours=2), unit="[degF]"),  # 38.61 °C
        # 100.9 °F is 38.28 °C: below 38.3 although it rounds to "38.3" — the rule uses the value, not the text.
        patient("f-warm"), severe_count("o-fw", "f-warm"),
        temperature("t-fw", "f-warm", 100.9, at(hours=2), unit="[degF]"),
    )
    adapter.run()

    hot = live_flag(fhir_server, "f-hot")
    assert_febrile(hot, "o-fh", {"t-fh"})
    assert "temperature 38.6 °C (101.5 °F as recorded) at 2026-11-20T10:00Z" in hot["code"]["text"]
    assert_not_febrile(live_flag(fhir_server, "f-warm"), "o-fw")


def test_an_unknown_temperature_unit_is_quarantined_not_guessed(fhir_server, adapter):
    # "degrees" could be °C or °F: the reading must not count either way.
    fhir_server.load(patient("p"), severe_count("o1", "p"),
                     temperature("t-deg", "p", 38.9, at(hours=2), unit="degrees"))
    adapter.run()

    assert_not_febrile(live_flag(fhir_server, "p"), "o1")
    assert adapter.quarantined() == {"t-deg": "unknown-unit"}


def test_implausible_temperatures_are_quarantined(fhir_server, adapter):
    readings = {"too-hot": (47.0, "Cel"), "slipped-digit": (3.8, "Cel"), "too-hot-f": (118.0, "[degF]")}
    for pid, (value, unit) in readings.items():
        fhir_server.load(patient(pid), severe_count(f"o-{pid}", pid),
                         temperature(f"t-{pid}", pid, value, at(hours=2), unit=unit))
    adapter.run()

    for pid in readings:
        assert_not_febrile(live_flag(fhir_server, pid), f"o-{pid}")
    assert adapter.quarantined() == {f"t-{pid}": "implausible-value" for pid in readings}


# -- febrile neutropenia over time: late fever, withdrawn fever -------------------------------------------

def test_a_fever_arriving_a_run_after_the_count_escalates_the_same_flag(fhir_server, adapter):
    fhir_server.load(patient("p"), severe_count("o1", "p"))
    adapter.run()
    before = live_flag(fhir_server, "p")
    assert_not_febrile(before, "o1")
    assert grade(before) == "severe"

    fhir_server.load(temperature("t-late", "p", 38.7, at(hours=5)))
    adapter.run()
    [after] = fhir_server.flags("p")
    assert after["id"] == before["id"]
    assert_febrile(after, "o1", {"t-late"})
    assert "temperature 38.7 °C at 2026-11-20T13:00Z" in after["code"]["text"]
    assert "Observation/t-late" in basis(risk_for(fhir_server, "p", "o1"))


def test_a_withdrawn_temperature_takes_the_fever_back_but_keeps_the_severe_alert(fhir_server, adapter):
    fhir_server.load(patient("p"), severe_count("o1", "p"), temperature("t1", "p", 38.9, at(hours=1)))
    adapter.run()
    before = live_flag(fhir_server, "p")
    assert_febrile(before, "o1", {"t1"})

    fhir_server.load(temperature("t1", "p", 38.9, at(hours=1), status="entered-in-error"))
    adapter.run()
    [after] = fhir_server.flags("p")
    assert after["id"] == before["id"]
    assert (after["status"], grade(after)) == ("active", "severe")
    assert_not_febrile(after, "o1", expected_priority="PH")  # still PH: severe on its own
    assert after["code"]["text"].startswith("Severe neutropenia: ANC 320 cells/µL")
    risk = risk_for(fhir_server, "p", "o1")
    assert "Observation/t1" not in basis(risk)
    assert qualitative_risk(risk) == "high"


# -- projection -------------------------------------------------------------------------------------------

def crossing(earlier: float, later: float, hours_apart: float) -> datetime:
    """When the log-linear line through two counts reaches 500, from the later count (at COUNT_TIME)."""
    per_hour = math.log(later / earlier) / hours_apart
    return COUNT_TIME + timedelta(hours=math.log(500 / later) / per_hour)


def per_ul(observation_id: str, patient_id: str, value: int, effective: str) -> dict:
    return anc(observation_id, patient_id, value, unit="/uL", effective=effective)


PROJECTED_BY = re.compile(r"projected to fall below 500 cells/µL by (\d{4}-\d\d-\d\dT\d\d:\d\dZ)")


def test_a_fall_projected_below_500_within_48_hours_is_said_and_predicted(fhir_server, adapter):
    # 1194 → 1000 over 12 h reaches 500 46.9 h after the later count; 1185 → 1000 only after 49.0 h.
    assert timedelta(hours=46.5) < crossing(1194, 1000, 12) - COUNT_TIME < timedelta(hours=47.5)
    assert timedelta(hours=48.5) < crossing(1185, 1000, 12) - COUNT_TIME < timedelta(hours=49.5)
    fhir_server.load(
        patient("h47"), per_ul("o-47a", "h47", 1194, at(hours=-12)), per_ul("o-47b", "h47", 1000, at()),
        patient("h49"), per_ul("o-49a", "h49", 1185, at(hours=-12)), per_ul("o-49b", "h49", 1000, at()),
        # A steep fall, but the counts are 5 h apart: too close together to project from.
        patient("h5"), per_ul("o-5a", "h5", 1600, at(hours=-5)), per_ul("o-5b", "h5", 1000, at()),
    )
    adapter.run()

    for pid, later in (("h49", "o-49b"), ("h5", "o-5b")):
        flag = live_flag(fhir_server, pid)
        assert grade(flag) == "mild" and "projected" not in flag["code"]["text"]
        assert len(risk_for(fhir_server, pid, later)["prediction"]) == 1

    flag = live_flag(fhir_server, "h47")
    assert (grade(flag), priority(flag), is_febrile(flag)) == ("mild", "PL", False)  # never changes the grade
    [by] = PROJECTED_BY.findall(flag["code"]["text"])
    projected = datetime.fromisoformat(by.replace("Z", "+00:00"))
    assert abs(projected - crossing(1194, 1000, 12)) <= timedelta(minutes=1)
    assert details(flag)[0] == "Observation/o-47b"

    risk = risk_for(fhir_server, "h47", "o-47b")
    assert len(risk["prediction"]) == 2
    fall = risk["prediction"][1]
    base = next(c["system"] for c in risk["code"]["coding"] if c["system"].endswith(GRADE_SUFFIX))
    outcome_system = base.removesuffix(GRADE_SUFFIX) + "/CodeSystem/outcome"  # under [output] system_base
    assert [(c["system"], c["code"]) for c in fall["outcome"]["coding"]] == [(outcome_system, "anc-below-500")]
    assert fall["outcome"]["text"] == "ANC below 500 cells/µL"
    start = datetime.fromisoformat(fall["whenPeriod"]["start"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(fall["whenPeriod"]["end"].replace("Z", "+00:00"))
    assert (start, end) == (COUNT_TIME, COUNT_TIME + timedelta(hours=48))
    assert "log-linear" in fall["rationale"].lower()


def test_a_projected_fall_with_a_fever_is_febrile_neutropenia_at_the_count_grade(fhir_server, adapter):
    fhir_server.load(
        patient("proj"), per_ul("o-pa", "proj", 1194, at(hours=-12)), per_ul("o-pb", "proj", 1000, at()),
        temperature("t-p", "proj", 38.5, at(hours=2)),
        # The same fever with a fall that reaches 500 only after 49 h: a mild count with a temperature.
        patient("slow"), per_ul("o-sa", "slow", 1185, at(hours=-12)), per_ul("o-sb", "slow", 1000, at()),
        temperature("t-s", "slow", 38.5, at(hours=2)),
    )
    adapter.run()

    flag = live_flag(fhir_server, "proj")
    assert_febrile(flag, "o-pb", {"t-p"}, count_grade="mild")
    assert flag["code"]["text"].startswith(
        "Febrile neutropenia: temperature 38.5 °C at 2026-11-20T10:00Z with mild neutropenia: "
        "ANC 1000 cells/µL on 2026-11-20")
    assert PROJECTED_BY.search(flag["code"]["text"])
    risk = risk_for(fhir_server, "proj", "o-pb")
    assert grade(risk) == "mild" and qualitative_risk(risk) == "high"
    assert "Observation/t-p" in basis(risk)

    slow = live_flag(fhir_server, "slow")
    assert_not_febrile(slow, "o-sb", expected_priority="PL")
    assert qualitative_risk(risk_for(fhir_server, "slow", "o-sb")) == "low"


# -- chemotherapy context ---------------------------------------------------------------------------------

CYCLOPHOSPHAMIDE = {"coding": [{"system": RXNORM, "code": "3002", "display": "cyclophosphamide"},
                               {"system": ATC, "code": "L01AA01", "display": "cyclophosphamide"}],
                    "text": "cyclophosphamide"}


def test_chemotherapy_within_the_lookback_is_said_with_its_date_and_referenced(fhir_server, adapter):
    cisplatin, methotrexate = atc("L01XA01", "cisplatin"), atc("L01BA01", "methotrexate")
    records = [
        # The count is at 2026-11-20T08:00Z; 42 days before it is 2026-10-09T08:00Z.
        medication_administration("ma-in", "in", at(days=-42, hours=1), cisplatin),
        medication_administration("ma-out", "out", at(days=-42, hours=-1), cisplatin),
        medication_administration("ma-not-done", "not-done", at(days=-3), cisplatin, status="not-done"),
        medication_administration("ma-after", "after", at(hours=4), cisplatin),  # after the count
        medication_administration("ma-other", "other", at(days=-3), atc("J01CA04", "amoxicillin")),
        medication("med-cyclo", CYCLOPHOSPHAMIDE),
        medication_administration("ma-ref", "ref", at(days=-10), medication_id="med-cyclo"),
        medication_administration("ma-today", "today", at(hours=-2), cisplatin, status="in-progress"),
        medication_request("mr-order", "order", at(days=-7), methotrexate),
        medication_request("mr-plan", "plan", at(days=-7), methotrexate, intent="plan"),
        chemotherapy_procedure("proc", "proc", at(days=-14)),
        chemotherapy_procedure("proc-not-done", "proc-not-done", at(days=-14), status="not-done"),
    ]
    said = {
        "in": ("after chemotherapy: cisplatin on 2026-10-09 (41 days before this count)",
               "MedicationAdministration/ma-in"),
        "ref": ("after chemotherapy: cyclophosphamide on 2026-11-10 (10 days before this count)",
                "MedicationAdministration/ma-ref"),
        "today": ("after chemotherapy: cisplatin on 2026-11-20 (0 days before this count)",
                  "MedicationAdministration/ma-today"),
        "order": ("after chemotherapy: methotrexate on 2026-11-13 (7 days before this count)",
                  "MedicationRequest/mr-order"),
        "proc": ("after chemotherapy: Chemotherapy (procedure) on 2026-11-06 (14 days before this count)",
                 "Procedure/proc"),
    }
    silent = ["out", "not-done", "after", "other", "plan", "proc-not-done"]
    patients = [r["subject"]["reference"].removeprefix("Patient/") for r in records if "subject" in r]
    assert sorted(patients) == sorted([*said, *silent])
    fhir_server.load(*[resource for pid in patients for resource in (patient(pid), severe_count(f"o-{pid}", pid))],
                     *records)
    adapter.run()

    for pid, (text, reference) in said.items():
        flag = live_flag(fhir_server, pid)
        assert text in flag["code"]["text"], pid
        assert flag["code"]["text"].startswith("Severe neutropenia: ANC 320 cells/µL on 2026-11-20"), pid
        assert details(flag)[0] == f"Observation/o-{pid}" and reference in details(flag)[1:], pid
        assert (priority(flag), is_febrile(flag)) == ("PH", False), pid
        assert reference in basis(risk_for(fhir_server, pid, f"o-{pid}")), pid
    for pid in silent:
        flag = live_flag(fhir_server, pid)
        assert "chemotherapy" not in flag["code"]["text"], pid
        assert details(flag) == [f"Observation/o-{pid}"], pid


# -- Duffy-null: only a site's explicit marker ------------------------------------------------------------

def test_site_marked_duffy_null_patients_are_graded_from_the_site_threshold(fhir_server, adapter):
    adapter.configure(duffy_codes=[f"{DUFFY_SYSTEM}|{DUFFY_CODE}"])
    fhir_server.load(
        patient("dn-1209"), duffy_null_marker("c-1209", "dn-1209"), per_ul("o-dn-1209", "dn-1209", 1209, at()),
        patient("dn-1210"), duffy_null_marker("c-1210", "dn-1210"), per_ul("o-dn-1210", "dn-1210", 1210, at()),
        patient("dn-999"), duffy_null_marker("c-999", "dn-999"), per_ul("o-dn-999", "dn-999", 999, at()),
        patient("plain-1210"), per_ul("o-plain-1210", "plain-1210", 1210, at()),
        # A marker no longer active is not a marker.
        patient("resolved-1300"), duffy_null_marker("c-res", "resolved-1300", clinical_status="resolved"),
        per_ul("o-resolved-1300", "resolved-1300", 1300, at()),
        # Race is not the phenotype: a patient recorded as Black but not marked is graded as anyone else.
        patient_with_race("black-1300"), per_ul("o-black-1300", "black-1300", 1300, at()),
    )
    adapter.run()

    expected = {"dn-1209": ("mild", "PL"), "dn-999": ("moderate", "PM")}
    for pid, (count_grade, count_priority) in expected.items():
        flag = live_flag(fhir_server, pid)
        assert (grade(flag), priority(flag)) == (count_grade, count_priority), pid
        assert DUFFY_TEXT in flag["code"]["text"], pid
    assert fhir_server.flags("dn-1210") == []  # normal from the site threshold up
    for pid in ("plain-1210", "resolved-1300", "black-1300"):
        flag = live_flag(fhir_server, pid)
        assert (grade(flag), priority(flag)) == ("mild", "PL"), pid
        assert "Duffy" not in flag["code"]["text"], pid


# -- priority ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("profile, counts", [
    ("clinical", {"mild": (1200, "PL"), "moderate": (800, "PM"), "severe": (300, "PH")}),
    ("ctcae-v5", {"ctcae-1": (1900, "PL"), "ctcae-2": (1200, "PL"), "ctcae-3": (800, "PM"),
                  "ctcae-4": (300, "PH")}),
])
def test_flag_priority_follows_the_grade_on_active_and_closed_flags(fhir_server, adapter, profile, counts):
    adapter.configure(profile=profile)
    for expected_grade, (value, _) in counts.items():
        fhir_server.load(patient(expected_grade), per_ul(f"o-{expected_grade}", expected_grade, value, at()))
    # A closed episode keeps a priority too: moderate, then a normal count a day later.
    fhir_server.load(patient("closed"), per_ul("o-closed-low", "closed", 800, at(days=-1)),
                     per_ul("o-closed-ok", "closed", 2500, at()))
    # With the shipped mappings no Condition is a Duffy-null marker (the list is empty by default).
    fhir_server.load(patient("unconfigured"), duffy_null_marker("c-u", "unconfigured"),
                     per_ul("o-u", "unconfigured", 1300, at()))
    adapter.run()

    for expected_grade, (_, expected_priority) in counts.items():
        flag = live_flag(fhir_server, expected_grade)
        assert (grade(flag), priority(flag)) == (expected_grade, expected_priority)
    [closed] = fhir_server.flags("closed")
    assert closed["status"] == "inactive"
    assert priority(closed) == {"moderate": "PM", "ctcae-3": "PM"}[grade(closed)]
    unconfigured = live_flag(fhir_server, "unconfigured")
    assert grade(unconfigured) == ("mild" if profile == "clinical" else "ctcae-2")
    assert "Duffy" not in unconfigured["code"]["text"]
