"""The Flag lookup before a patient's first Flag (adoption after state loss) costs one request per run when
the server holds no Flag of ours, and stays a lookup per batch of patients when it does."""

from __future__ import annotations

import pytest
import responses

from adapter.cli import main
from builders import anc, patient
from test_pipeline import BASE, CAPABILITY, EMPTY_SEARCH, FLAG_SEARCH, ID_SEARCH, ids_exist, page, transaction_echo

OURS = {"resourceType": "Flag", "id": "f-old", "status": "active",
        "identifier": [{"system": "https://hospital.example/fhir/anc-adapter/Flag", "value": "zz/o-old"}],
        "subject": {"reference": "Patient/zz"}, "code": {"text": "old"}}


def flag_gets(mock) -> list[str]:
    return [c.request.url for c in mock.calls if c.request.method == "GET" and "/Flag" in c.request.url]


def run(mock, tmp_path, flags_on_server: list[dict], entry_left_out: bool = False) -> list[str]:
    mock.get(f"{BASE}/metadata", json=CAPABILITY)
    answer = {**EMPTY_SEARCH, "entry": [{"resource": f} for f in flags_on_server]}
    if entry_left_out:
        del answer["entry"]
    mock.get(FLAG_SEARCH, json=answer)
    mock.add_callback(responses.POST, BASE, callback=transaction_echo)
    # 120 newly flagged patients over two pages: without the check, three lookups of 50 patients.
    mock.get(f"{BASE}/Observation", json=page(*(anc(f"o{n}", f"p{n}", 0.4) for n in range(60)),
                                               next_url=f"{BASE}/Observation?page=2"))
    mock.get(f"{BASE}/Observation?page=2", json=page(*(anc(f"o{n}", f"p{n}", 0.4) for n in range(60, 120))))
    for n in range(120):
        mock.get(f"{BASE}/Patient/p{n}", json={"resourceType": "Patient", "id": f"p{n}", "birthDate": "1970-01-01"})
    assert main(["run", "--fhir-url", BASE, "--state", str(tmp_path / "s.sqlite3")]) == 0
    return flag_gets(mock)


@pytest.mark.parametrize("entry_left_out", [False, True])  # an empty searchset may have no `entry`
def test_no_flag_of_ours_on_the_server_means_one_check_and_no_lookup(tmp_path, entry_left_out):
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        gets = run(mock, tmp_path, [], entry_left_out)
    assert len(gets) == 1, gets
    assert "_tag=" in gets[0] and "subject=" not in gets[0]


def test_flags_of_ours_on_the_server_mean_a_lookup_per_batch_of_new_patients(tmp_path):
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        gets = run(mock, tmp_path, [OURS])
    lookups = [g for g in gets if "subject=" in g]
    assert len(gets) == 1 + len(lookups) and len(lookups) >= 3, gets  # 120 patients, 50 per lookup


def second_run(tmp_path, total_on_server) -> list[str]:
    """A first run writes the Flags of 120 patients; then the server answers the check with `total` and the
    second run flags 60 new patients."""
    state = str(tmp_path / "s.sqlite3")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        run(mock, tmp_path, [])
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(f"{BASE}/metadata", json=CAPABILITY)
        mock.get(FLAG_SEARCH, json={**EMPTY_SEARCH, "total": total_on_server, "entry": []})
        mock.add_callback(responses.POST, BASE, callback=transaction_echo)
        mock.add_callback(responses.GET, f"{BASE}/Observation", callback=ids_exist, match=ID_SEARCH)
        mock.get(f"{BASE}/Observation", json=page(*(anc(f"o{n}", f"p{n}", 0.4) for n in range(120, 180)),
                                                   included=[patient(f"p{n}") for n in range(120, 180)]))
        assert main(["run", "--fhir-url", BASE, "--state", state]) == 0
        return flag_gets(mock)


def test_a_server_holding_exactly_the_flags_the_state_knows_needs_no_lookup(tmp_path):
    gets = second_run(tmp_path, 120)
    assert len(gets) == 1 and "_summary=count" in gets[0], gets  # the count; no `subject=` lookups


@pytest.mark.parametrize("total", [121, 119])  # a lost or restored state; a Flag of ours deleted
def test_a_server_holding_other_flags_than_the_state_knows_gets_the_lookups(tmp_path, total):
    gets = second_run(tmp_path, total)
    lookups = [g for g in gets if "subject=" in g]
    assert len(lookups) == 2, gets  # 60 new patients, 50 per lookup


def test_a_lookup_keeps_its_subjects_within_the_url_budget_however_long_the_ids(tmp_path):
    from urllib.parse import parse_qs, urlsplit

    from adapter.context_source import SUBJECT_CHARS

    patients = [f"p{n:02d}-" + "x" * 60 for n in range(50)]  # 50 a lookup, but 50 × 72 characters is too long
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(f"{BASE}/metadata", json=CAPABILITY)
        mock.get(FLAG_SEARCH, json={**EMPTY_SEARCH, "entry": [{"resource": OURS}]})
        mock.add_callback(responses.POST, BASE, callback=transaction_echo)
        mock.get(f"{BASE}/Observation", json=page(*(anc(f"o{n}", p, 0.4) for n, p in enumerate(patients))))
        for p in patients:
            mock.get(f"{BASE}/Patient/{p}", json={"resourceType": "Patient", "id": p, "birthDate": "1970-01-01"})
        assert main(["run", "--fhir-url", BASE, "--state", str(tmp_path / "s.sqlite3")]) == 0
        subjects = [parse_qs(urlsplit(g).query)["subject"][0] for g in flag_gets(mock) if "subject=" in g]
    assert len(subjects) == 2 and all(len(s) <= SUBJECT_CHARS for s in subjects)
    assert sorted(r for s in subjects for r in s.split(",")) == sorted(f"Patient/{p}" for p in patients)
