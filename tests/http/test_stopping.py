"""A stop request (SIGTERM/SIGINT) ends a run at a safe point and gives up waiting on a hung server; a run
stopped early leaves a resume point that the next run searches from."""

from __future__ import annotations

import json
import re
import threading
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

from adapter import cli
from adapter import config as config_module
from adapter.cli import main, run_once
from adapter.errors import FhirError, Stopped
from adapter.fhir.client import FhirClient, session
from adapter.pipeline import Window
from adapter.state import ResumePoint, State
from adapter.stopping import Stop
from builders import anc, patient

BASE = "https://fhir.example.org/r4"
CAPABILITY = {
    "resourceType": "CapabilityStatement",
    "rest": [{"mode": "server", "interaction": [{"code": "transaction"}], "resource": [
        {"type": "Flag", "conditionalUpdate": True, "searchParam": [{"name": "identifier"}]},
    ]}],
}


def observation(observation_id: str, patient_id: str, value: float, last_updated: str, version: str = "1"):
    return anc(observation_id, patient_id, value, meta={"versionId": version, "lastUpdated": last_updated})


def bundle(*resources, next_url=None):
    return {"resourceType": "Bundle", "type": "searchset",
            "link": [{"relation": "next", "url": next_url}] if next_url else [],
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]
            + [{"resource": patient(p), "search": {"mode": "include"}}
               for p in sorted({r["subject"]["reference"].split("/")[1] for r in resources})]}


class FakeServer:
    """Pages of Observations in _lastUpdated order; records each search's _lastUpdated bound."""

    def __init__(self, mock: responses.RequestsMock, on_write=None):
        self.pages: list[list[dict]] = []
        self.bounds: list[str | None] = []
        self.on_write = on_write
        mock.get(f"{BASE}/metadata", json=CAPABILITY)
        mock.get(re.compile(rf"{re.escape(BASE)}/Flag\b.*"),
                 json={"resourceType": "Bundle", "type": "searchset", "entry": []})
        mock.add_callback(responses.GET, re.compile(rf"{re.escape(BASE)}/Observation\b.*"), callback=self.search)
        mock.add_callback(responses.POST, BASE, callback=self.write)

    def search(self, request):
        query = parse_qs(urlsplit(request.url).query)
        number = int(query.get("page", ["0"])[0])
        if number == 0:
            self.bounds.append(query.get("_lastUpdated", [None])[0])
        since = self.bounds[-1][2:] if self.bounds[-1] else ""
        chosen = [o for o in self.pages[number] if not since or o["meta"]["lastUpdated"] >= since] \
            if number < len(self.pages) else []
        next_url = f"{BASE}/Observation?page={number + 1}" if number + 1 < len(self.pages) else None
        return 200, {}, json.dumps(bundle(*chosen, next_url=next_url))

    def write(self, request):
        if self.on_write:
            self.on_write()
        entries = json.loads(request.body)["entry"]
        return 200, {}, json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": [
            {"response": {"status": "201 Created", "location": f"Flag/f{i}/_history/1"}}
            for i, _ in enumerate(entries)]})


def config(tmp_path: Path):
    return config_module.load(None).with_overrides(fhir={"base_url": BASE, "retries": 0},
                                                   state={"path": str(tmp_path / "s.sqlite3")})


PAGE_1 = [observation("o1", "a", 0.4, "2026-11-20T10:00:00.100Z"), observation("o2", "b", 0.9, "2026-11-20T10:00:00.250Z")]
PAGE_2 = [observation("o3", "c", 0.3, "2026-11-20T10:05:00.500Z")]


def test_a_stop_after_a_page_ends_the_run_there_with_exit_6_and_a_resume_point(tmp_path):
    stop = Stop()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        server = FakeServer(mock, on_write=stop.set)  # the signal arrives while page 1 is being written
        server.pages = [PAGE_1, PAGE_2]
        code, summary = run_once(config(tmp_path), tmp_path / "s.sqlite3", "r1", stop=stop)
        assert code == 6
        assert (summary.pages, summary.stopped, summary.complete, summary.created) == (1, True, False, 2)
        state = State.open(tmp_path / "s.sqlite3")
        assert state.watermark() is None
        assert state.resume_point().resume_at == "2026-11-20T10:00:00.250000+00:00"
        assert state.last_runs(1)[0]["exit_code"] == 6

        code, summary = run_once(config(tmp_path), tmp_path / "s.sqlite3", "r2")
        assert code == 0 and summary.complete
        assert server.bounds[-1] == "ge2026-11-20T10:00:00.250Z"  # on from page 1, not from the start
        assert summary.observations_read == 2  # o2 (stamped at the resume instant, skipped) and o3
        state = State.open(tmp_path / "s.sqlite3")
        assert state.watermark() == "2026-11-20T10:05:00.500000+00:00"
        assert state.resume_point() is None


def test_a_new_version_of_an_observation_an_earlier_run_of_the_pass_read_makes_it_read_again(tmp_path):
    path = tmp_path / "s.sqlite3"
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        server = FakeServer(mock)
        server.pages = [PAGE_1, PAGE_2]
        assert run_once(config(tmp_path), path, "r1", max_duration_s=0)[0] == 0
        # o1 changed after run 1 read it: it now sorts last, and had it moved while run 1 paged, an entry
        # could have slid past run 1's page boundary unseen.
        server.pages = [[PAGE_1[1], PAGE_2[0], observation("o1", "a", 0.3, "2026-11-20T10:06:00.000Z", "2")]]
        code, summary = run_once(config(tmp_path), path, "r2")
        assert code == 0 and summary.complete
        state = State.open(path)
        assert state.watermark() is None  # the search reached the end, but the pass is not finished
        assert state.resume_point().resume_at == "2026-11-20T10:00:00.100000+00:00"  # o1's old lastUpdated
        code, summary = run_once(config(tmp_path), path, "r3")
        assert server.bounds[-1] == "ge2026-11-20T10:00:00.100Z"
        state = State.open(path)
        assert state.resume_point() is None and state.watermark() == "2026-11-20T10:06:00+00:00"


def test_a_resume_point_for_other_codes_is_dropped_and_a_backfill_neither_uses_nor_keeps_one(tmp_path):
    path = tmp_path / "s.sqlite3"
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        server = FakeServer(mock)
        server.pages = [PAGE_1, PAGE_2]
        state = State.open(path)
        with state.transaction():
            state.set_watermark("2026-11-20T09:00:00+00:00")
            state.set_resume_point(ResumePoint(search="http://loinc.org|751-8", since="2026-11-20T08:55:00+00:00",
                                               resume_at="2026-11-20T10:00:00.250000+00:00", max_seen=None,
                                               runs=1, started="2026-11-20T10:00:00+00:00"))
        window = Window(since=datetime(2026, 11, 1, tzinfo=timezone.utc))
        assert run_once(config(tmp_path), path, "backfill", window=window, max_duration_s=0)[0] == 0
        assert server.bounds[-1] == "ge2026-11-01T00:00:00Z"
        assert State.open(path).resume_point().resume_at == "2026-11-20T10:00:00.250000+00:00"  # untouched
        assert run_once(config(tmp_path), path, "live")[0] == 0
        assert server.bounds[-1] == "ge2026-11-20T08:55:00Z"  # watermark − overlap: the codes differ
        assert State.open(path).resume_point() is None


def test_status_shows_the_resume_point(tmp_path, capsys):
    path = tmp_path / "s.sqlite3"
    state = State.open(path)
    with state.transaction():
        state.set_resume_point(ResumePoint(search="x", since="2026-11-20T08:55:00+00:00",
                                           resume_at="2026-11-20T10:00:00.250000+00:00", max_seen=None,
                                           runs=3, started="2026-11-20T10:00:00+00:00"))
    assert main(["status", "--state", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["resume_point"]["resume_at"] == "2026-11-20T10:00:00.250000+00:00"
    assert report["resume_point"]["runs"] == 3


# -- the client gives up waiting on the server once a stop is requested --------------------------

@pytest.mark.parametrize("call", ["get", "transaction", "search"])
def test_a_stop_gives_up_a_request_the_server_does_not_answer(call):
    stop, released = Stop(), threading.Event()

    def hang(request):
        stop.set()  # the signal arrives while the server holds the request
        released.wait(30)
        return 200, {}, json.dumps({"resourceType": "Bundle", "type": "searchset"})

    client = FhirClient(BASE, session(), stop=stop)
    try:
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            for method in (responses.GET, responses.POST):
                mock.add_callback(method, re.compile(rf"{re.escape(BASE)}.*"), callback=hang)
            with pytest.raises(Stopped):
                if call == "get":
                    client.get("metadata")
                elif call == "transaction":
                    client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": []})
                else:
                    next(client.search("Observation", {}))
    finally:
        released.set()


def test_after_a_stop_nothing_new_is_sent():
    stop = Stop()
    stop.set()
    client = FhirClient(BASE, session(), stop=stop)
    with responses.RequestsMock() as mock:  # any request would fail: none is registered
        with pytest.raises(Stopped):
            client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": []})
        assert not mock.calls


def test_ctrl_c_outside_a_run_is_exit_6_not_an_internal_error(monkeypatch, tmp_path):
    def interrupted(args, run_id):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_status", interrupted)
    assert main(["status", "--state", str(tmp_path / "s.sqlite3")]) == 6


def test_a_failing_server_is_still_exit_3_with_a_stop_installed(tmp_path):
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(f"{BASE}/metadata", body=requests.ConnectionError("refused"))
        with pytest.raises(FhirError) as failed:
            run_once(config(tmp_path), tmp_path / "s.sqlite3", "r1", stop=Stop())
    assert failed.value.exit_code == 3
