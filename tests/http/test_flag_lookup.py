"""The Flag lookup before a patient's first Flag (adoption after state loss) costs one request per run when
the server holds no Flag of ours, and stays a lookup per batch of patients when it does."""

from __future__ import annotations

import pytest
import responses

from adapter.cli import main
from builders import anc
from test_pipeline import BASE, CAPABILITY, EMPTY_SEARCH, FLAG_SEARCH, page, transaction_echo

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
