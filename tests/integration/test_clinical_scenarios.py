"""Issue 3 scenarios on the real local server: arrival order, amendments, withdrawals, recovery, RA."""

from __future__ import annotations

import pytest

from adapter.cli import main
from builders import anc, patient

pytestmark = pytest.mark.integration


@pytest.fixture
def adapter(fhir_server, tmp_path):
    config = tmp_path / "adapter.toml"
    config.write_text('[output]\nresources = ["Flag", "RiskAssessment"]\n')

    def run(*extra: str) -> int:
        code = main(["run", "--config", str(config), "--fhir-url", fhir_server.base_url,
                     "--state", str(tmp_path / "state.sqlite3"), "--log-format", "json", *extra])
        assert code == 0
        return code

    return run


def grade(resource: dict) -> str:
    return next(c["code"] for c in resource["code"]["coding"] if c["system"].endswith("/neutropenia-grade"))


def by_status(flags: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for flag in flags:
        out.setdefault(flag["status"], []).append(flag)
    return out


def test_flag_follows_the_latest_count_by_effective_time_not_arrival(fhir_server, adapter):
    fhir_server.load(patient("p"), anc("o-late", "p", 0.3, effective="2026-11-22T08:00:00Z"))
    adapter()
    # An older, milder count arrives afterwards: the Flag must keep showing the newer severe one.
    fhir_server.load(anc("o-early", "p", 1.2, effective="2026-11-20T08:00:00Z"))
    adapter()
    [flag] = fhir_server.flags("p")
    assert flag["status"] == "active" and grade(flag) == "severe"
    assert flag["period"]["start"].startswith("2026-11-20T08:00")  # the episode began with the older count
    assert flag["extension"][0]["valueReference"]["reference"] == "Observation/o-late"


def test_grade_change_updates_the_same_flag_in_place(fhir_server, adapter):
    fhir_server.load(patient("p"), anc("o1", "p", 1.2, effective="2026-11-20T08:00:00Z"))
    adapter()
    [before] = fhir_server.flags("p")
    fhir_server.load(anc("o2", "p", 0.4, effective="2026-11-21T08:00:00Z"))
    adapter()
    [after] = fhir_server.flags("p")
    assert after["id"] == before["id"]
    assert (grade(before), grade(after)) == ("mild", "severe")
    assert after["status"] == "active"


def test_recovery_closes_the_flag_and_a_new_episode_opens_a_new_flag(fhir_server, adapter):
    fhir_server.load(patient("p"), anc("o1", "p", 0.4, effective="2026-11-20T08:00:00Z"),
                     anc("o2", "p", 2.1, effective="2026-11-22T08:00:00Z"))
    adapter()
    [closed] = fhir_server.flags("p")
    assert closed["status"] == "inactive"
    assert closed["period"]["end"].startswith("2026-11-22T08:00")
    fhir_server.load(anc("o3", "p", 0.9, effective="2026-11-24T08:00:00Z"))
    adapter()
    flags = by_status(fhir_server.flags("p"))
    assert len(flags["inactive"]) == 1 and len(flags["active"]) == 1  # never two active at once
    assert grade(flags["active"][0]) == "moderate"


def test_amendment_to_normal_closes_the_flag_and_amends_the_risk_assessment(fhir_server, adapter):
    fhir_server.load(patient("p"), anc("o1", "p", 0.4, effective="2026-11-20T08:00:00Z"))
    adapter()
    [flag] = fhir_server.flags("p")
    assert flag["status"] == "active"
    [risk] = fhir_server.risk_assessments("p")
    assert risk["status"] == "final"
    assert risk["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] == "high"

    fhir_server.load(anc("o1", "p", 2.4, effective="2026-11-20T08:00:00Z", status="amended"))
    adapter()
    flags = fhir_server.flags("p")
    assert [f["status"] for f in flags] == ["entered-in-error"]  # no abnormal evidence remains
    [risk] = fhir_server.risk_assessments("p")
    assert risk["status"] == "amended"
    assert risk["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] == "negligible"


def test_entered_in_error_withdraws_what_we_wrote(fhir_server, adapter):
    fhir_server.load(patient("p"), anc("o1", "p", 0.4))
    adapter()
    fhir_server.load(anc("o1", "p", 0.4, status="entered-in-error"))
    adapter()
    [flag] = fhir_server.flags("p")
    assert flag["status"] == "entered-in-error"
    [risk] = fhir_server.risk_assessments("p")
    assert risk["status"] == "entered-in-error"


def test_withdrawing_one_of_two_counts_regrades_from_the_remaining_one(fhir_server, adapter):
    fhir_server.load(patient("p"), anc("o1", "p", 1.2, effective="2026-11-20T08:00:00Z"),
                     anc("o2", "p", 0.3, effective="2026-11-21T08:00:00Z"))
    adapter()
    fhir_server.load(anc("o2", "p", 0.3, effective="2026-11-21T08:00:00Z", status="entered-in-error"))
    adapter()
    [flag] = fhir_server.flags("p")
    assert flag["status"] == "active" and grade(flag) == "mild"
    assert flag["extension"][0]["valueReference"]["reference"] == "Observation/o1"


def test_preliminary_results_are_ignored_unless_configured(fhir_server, adapter, tmp_path):
    fhir_server.load(patient("p"), anc("o1", "p", 0.3, status="preliminary"))
    adapter()
    assert fhir_server.flags("p") == []


def test_comparator_result_is_graded_at_least_and_says_so(fhir_server, adapter):
    fhir_server.load(patient("p"), anc("o1", "p", 1.0, comparator="<"))
    adapter()
    [flag] = fhir_server.flags("p")
    assert grade(flag) == "moderate"
    assert flag["code"]["text"].startswith("At least moderate neutropenia: ANC <1000 cells/µL")


def test_quarantine_is_retried_after_a_site_adds_a_unit_alias(fhir_server, tmp_path):
    import shutil
    from pathlib import Path

    site = tmp_path / "site-mappings"
    shutil.copytree(Path(__file__).parents[2] / "mappings", site)
    config = tmp_path / "adapter.toml"
    config.write_text(f'[mappings]\npath = "{site}"\n')
    args = ["run", "--config", str(config), "--fhir-url", fhir_server.base_url,
            "--state", str(tmp_path / "state.sqlite3")]
    fhir_server.load(patient("p"), anc("o1", "p", 0.35, unit="Giga/L"))
    assert main(args) == 0
    assert fhir_server.flags("p") == []
    units = site / "units.toml"
    units.write_text(units.read_text() + '"Giga/L" = 1000\n')
    assert main(args) == 0  # no new data: the quarantined Observation is graded from state
    [flag] = fhir_server.flags("p")
    assert grade(flag) == "severe"


def wbc(observation_id, patient_id, value, effective="2026-11-20T08:00:00Z", **kw):
    return anc(observation_id, patient_id, value, code="6690-2", effective=effective, **kw)


def percent(observation_id, patient_id, value, code, effective="2026-11-20T08:00:00Z", **kw):
    return anc(observation_id, patient_id, value, unit="%", code=code, effective=effective, **kw)


@pytest.fixture
def deriving(fhir_server, tmp_path):
    config = tmp_path / "adapter.toml"
    config.write_text('[classify]\nderive = true\n[output]\nresources = ["Flag", "RiskAssessment"]\n')
    return ["run", "--config", str(config), "--fhir-url", fhir_server.base_url,
            "--state", str(tmp_path / "state.sqlite3")]


def test_derived_anc_from_wbc_and_differential_when_opted_in(fhir_server, deriving):
    # WBC 2.0 × 10³/µL with 20 % segs + 5 % bands = 500 cells/µL -> moderate, said to be derived.
    fhir_server.load(patient("p"), wbc("w", "p", 2.0), percent("s", "p", 20, "769-0"),
                     percent("b", "p", 5, "764-1"))
    assert main(deriving) == 0
    [flag] = fhir_server.flags("p")
    assert grade(flag) == "moderate"
    assert "ANC 500 cells/µL" in flag["code"]["text"] and "derived from WBC and differential" in flag["code"]["text"]
    [risk] = fhir_server.risk_assessments("p")
    assert {b["reference"] for b in risk["basis"]} == {"Observation/w", "Observation/s", "Observation/b",
                                                       "Patient/p"}


def test_no_derived_anc_without_opt_in_or_with_missing_bands(fhir_server, tmp_path, deriving):
    fhir_server.load(patient("p"), wbc("w", "p", 2.0), percent("s", "p", 20, "769-0"))
    assert main(deriving) == 0  # segs without bands would understate the ANC: not derived
    assert fhir_server.flags("p") == []
    fhir_server.load(percent("b", "p", 5, "764-1"))
    plain = ["run", "--fhir-url", fhir_server.base_url, "--state", str(tmp_path / "plain.sqlite3")]
    assert main(plain) == 0  # derive is opt-in
    assert fhir_server.flags("p") == []


def test_a_measured_anc_at_the_same_time_wins_over_the_derived_one(fhir_server, deriving):
    fhir_server.load(patient("p"), wbc("w", "p", 2.0), percent("n", "p", 25, "770-8"))
    assert main(deriving) == 0
    [flag] = fhir_server.flags("p")
    assert grade(flag) == "moderate"
    fhir_server.load(anc("m", "p", 1.2, effective="2026-11-20T10:00:00+02:00"))  # same instant, other offset
    assert main(deriving) == 0
    [flag] = fhir_server.flags("p")
    assert grade(flag) == "mild"
    assert flag["extension"][0]["valueReference"]["reference"] == "Observation/m"
    [risk_derived] = [r for r in fhir_server.risk_assessments("p") if r["identifier"][0]["value"].startswith("p/derived-")]
    assert risk_derived["status"] == "entered-in-error"


def test_ctcae_profile_uses_the_reference_range_lln_and_writes_ctcae_grades(fhir_server, tmp_path):
    config = tmp_path / "ctcae.toml"
    config.write_text('[classify]\nprofile = "ctcae-v5"\n[output]\nresources = ["Flag", "RiskAssessment"]\n')
    low = {"low": {"value": 1.8, "unit": "10*3/uL", "system": "http://unitsofmeasure.org", "code": "10*3/uL"}}
    fhir_server.load(
        patient("g1"), anc("o-g1", "g1", 1.7, referenceRange=[low]),      # < LLN 1800, >= 1500: grade 1
        patient("g1-default"), anc("o-g1d", "g1-default", 1.9),             # < default LLN 2000: grade 1
        patient("g0"), anc("o-g0", "g0", 1.9, referenceRange=[low]),       # >= LLN 1800: not decreased
        patient("g4"), anc("o-g4", "g4", 0.2),
    )
    assert main(["run", "--config", str(config), "--fhir-url", fhir_server.base_url,
                 "--state", str(tmp_path / "s.sqlite3")]) == 0
    grades = {f["subject"]["reference"]: grade(f) for f in fhir_server.flags()}
    assert grades == {"Patient/g1": "ctcae-1", "Patient/g1-default": "ctcae-1", "Patient/g4": "ctcae-4"}
    [risk] = fhir_server.risk_assessments("g4")
    assert risk["method"]["coding"][0]["code"] == "ctcae-v5"
    assert risk["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] == "high"


def test_neonate_and_unknown_age_are_said_in_the_flag_text(fhir_server, adapter):
    fhir_server.load(
        patient("newborn", "2026-11-15"), anc("o-nb", "newborn", 0.8, effective="2026-11-20T08:00:00Z"),
        patient("nobirth", None), anc("o-nob", "nobirth", 1.2, effective="2026-11-20T08:00:00Z"),
    )
    adapter()
    [newborn] = fhir_server.flags("newborn")
    assert grade(newborn) == "moderate"
    assert "neonate: verify against local reference ranges" in newborn["code"]["text"]
    [unknown] = fhir_server.flags("nobirth")
    assert grade(unknown) == "mild"  # adult thresholds when the age is unknown
    assert "age unknown: adult thresholds" in unknown["code"]["text"]


# -- found in review: identity, moves and superseded versions --------------------------------------------

def test_a_result_moved_to_another_patient_moves_the_alert(fhir_server, adapter):
    fhir_server.load(patient("wrong"), patient("right"), anc("o1", "wrong", 0.3))
    adapter()
    assert [f["status"] for f in fhir_server.flags("wrong")] == ["active"]
    fhir_server.load(anc("o1", "right", 0.3, status="corrected"))  # the lab re-files it
    adapter()
    assert [f["status"] for f in fhir_server.flags("wrong")] == ["entered-in-error"]
    assert [(f["status"], grade(f)) for f in fhir_server.flags("right")] == [("active", "severe")]


def test_an_amendment_in_an_unknown_unit_keeps_the_live_alert_until_it_can_be_graded(fhir_server, adapter):
    fhir_server.load(patient("p"), anc("o1", "p", 0.3))
    adapter()
    fhir_server.load(anc("o1", "p", 0.25, unit="x10^3/µL", status="amended"))
    adapter()
    [flag] = fhir_server.flags("p")
    assert (flag["status"], grade(flag)) == ("active", "severe")  # not retracted over a unit spelling
    [risk] = fhir_server.risk_assessments("p")
    assert risk["status"] == "final"


def test_a_backfilled_older_episode_does_not_renumber_or_swap_the_current_flag(fhir_server, adapter):
    fhir_server.load(patient("p"), anc("now", "p", 0.3, effective="2026-11-20T08:00:00Z"))
    adapter()
    [current] = fhir_server.flags("p")
    fhir_server.load(anc("oct-low", "p", 0.9, effective="2026-10-01T08:00:00Z"),
                     anc("oct-ok", "p", 2.5, effective="2026-10-08T08:00:00Z"))
    adapter()
    flags = {f["id"]: f for f in fhir_server.flags("p")}
    assert flags[current["id"]]["status"] == "active"  # same resource, still the live alert
    assert grade(flags[current["id"]]) == "severe"
    assert flags[current["id"]]["meta"]["versionId"] == current["meta"]["versionId"]  # not even touched
    [older] = [f for i, f in flags.items() if i != current["id"]]
    assert older["status"] == "inactive" and older["period"]["end"].startswith("2026-10-08")


def test_withdrawing_a_closed_older_episode_leaves_the_current_flag_alone(fhir_server, adapter):
    fhir_server.load(patient("p"), anc("oct-low", "p", 0.9, effective="2026-10-01T08:00:00Z"),
                     anc("oct-ok", "p", 2.5, effective="2026-10-08T08:00:00Z"),
                     anc("now", "p", 0.3, effective="2026-11-20T08:00:00Z"))
    adapter()
    [current] = [f for f in fhir_server.flags("p") if f["status"] == "active"]
    fhir_server.load(anc("oct-low", "p", 0.9, effective="2026-10-01T08:00:00Z", status="entered-in-error"))
    adapter()
    flags = {f["id"]: f for f in fhir_server.flags("p")}
    assert flags[current["id"]]["status"] == "active" and grade(flags[current["id"]]) == "severe"
    assert sorted(f["status"] for f in flags.values()) == ["active", "entered-in-error"]


def test_derived_anc_returns_when_the_measured_one_at_that_time_is_withdrawn(fhir_server, deriving):
    fhir_server.load(patient("p"), wbc("w", "p", 1.0), percent("n", "p", 30, "770-8"),
                     anc("m", "p", 2.0))
    assert main(deriving) == 0
    assert fhir_server.flags("p") == []  # the measured 2000 wins: normal
    fhir_server.load(anc("m", "p", 2.0, status="entered-in-error"))
    assert main(deriving) == 0
    [flag] = fhir_server.flags("p")
    assert grade(flag) == "severe"  # derived 1000 × 30 % = 300


def test_provenance_per_write_names_the_observations_and_is_not_duplicated_on_rerun(fhir_server, tmp_path):
    config = tmp_path / "prov.toml"
    config.write_text('[output]\nresources = ["Flag", "RiskAssessment"]\nprovenance = true\n')
    args = ["run", "--config", str(config), "--fhir-url", fhir_server.base_url,
            "--state", str(tmp_path / "s.sqlite3")]
    fhir_server.load(patient("p"), anc("o1", "p", 0.3, effective="2026-11-20T08:00:00Z"))
    assert main(args) == 0
    [flag] = fhir_server.flags("p")
    [risk] = fhir_server.risk_assessments("p")
    provenances = fhir_server.search("Provenance")
    targets = {p["target"][0]["reference"]: p for p in provenances}
    assert set(targets) == {f"Flag/{flag['id']}", f"RiskAssessment/{risk['id']}"}
    assert all(p["entity"] == [{"role": "source", "what": {"reference": "Observation/o1"}}]
               for p in provenances)
    assert main(args) == 0  # nothing changed: no new write, no new Provenance
    assert len(fhir_server.search("Provenance")) == 2
    fhir_server.load(anc("o2", "p", 0.8, effective="2026-11-21T08:00:00Z"))
    assert main(args) == 0  # the Flag changes grade: one Provenance for that new version
    flag_provenance = [p for p in fhir_server.search("Provenance") if p["target"][0]["reference"] == f"Flag/{flag['id']}"]
    assert len(flag_provenance) == 2
    assert {e["what"]["reference"] for p in flag_provenance for e in p["entity"]} == {"Observation/o1",
                                                                                      "Observation/o2"}


def test_segmented_plus_band_counts_make_an_anc_when_opted_in(fhir_server, deriving):
    fhir_server.load(patient("p"), anc("s", "p", 0.35, code="768-2"), anc("b", "p", 0.05, code="763-3"))
    assert main(deriving) == 0
    [flag] = fhir_server.flags("p")
    assert grade(flag) == "severe"  # 350 + 50 = 400 cells/µL
    assert "ANC 400 cells/µL" in flag["code"]["text"]
    assert "derived from segmented and band neutrophil counts" in flag["code"]["text"]
