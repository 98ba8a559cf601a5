"""Issue 13: how pages are batched for writing — a batch is bounded, its writes overlap the next page's
extraction, and a stop rolls back just the open batch."""

from __future__ import annotations

import json
import re
import threading
from urllib.parse import parse_qs, urlsplit

import responses

from adapter import pipeline
from adapter.cli import run_once
from adapter.state import State
from adapter.stopping import Stop
from test_stopping import BASE, FakeServer, config, observation


def stamp(n: int) -> str:
    return f"2026-11-20T10:{n:02d}:00.000Z"


def posted(mock) -> list[dict]:
    return [json.loads(c.request.body) for c in mock.calls if c.request.method == "POST"]


def test_batch_observations_writes_after_that_many_counts(tmp_path):
    # Five pages of two counts of patient a: by size, four counts a batch (two pages), then the rest.
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        server = FakeServer(mock)
        server.pages = [[observation(f"o{2 * k + j}", "a", 0.4, stamp(2 * k + j)) for j in range(2)] for k in range(5)]
        cfg = config(tmp_path).with_overrides(poll={"batch_observations": 4})
        code, summary = run_once(cfg, tmp_path / "s.sqlite3", "r1")
        assert code == 0 and summary.complete and summary.pages == 5
        assert len(posted(mock)) == 3


def test_pages_sharing_patients_are_batched_up_to_the_cap_so_memory_stays_bounded(tmp_path, monkeypatch):
    """A chain of pages, each sharing a patient with the one before, would make one batch of the whole pass:
    the cap ends the batch, and what the run holds for a batch (its touched patients) stays within it."""
    monkeypatch.setattr(pipeline, "_BATCH_OBSERVATIONS", 6)
    held: list[int] = []
    settle = pipeline.Run._settle

    def measured(self, *args, **kwargs):
        held.append(len(self._touched))
        return settle(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.Run, "_settle", measured)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        server = FakeServer(mock)
        server.pages = [[observation(f"o{k}a", f"p{k}", 0.4, stamp(2 * k)),
                         observation(f"o{k}b", f"p{k + 1}", 0.8, stamp(2 * k + 1))] for k in range(12)]
        code, summary = run_once(config(tmp_path), tmp_path / "s.sqlite3", "r1")
        assert code == 0 and summary.complete and summary.pages == 12
        assert len(posted(mock)) == 4  # 12 pages of 2 counts, a batch ends at 6
        assert held and max(held) <= 6  # patients touched by one batch, never the pass's 13
        flags = [e["resource"] for bundle in posted(mock) for e in bundle["entry"]]
        assert {f["subject"]["reference"] for f in flags} == {f"Patient/p{k}" for k in range(13)}


def test_the_next_page_is_extracted_while_the_writes_are_in_flight(tmp_path, monkeypatch):
    extracted_ahead = threading.Event()
    extract = pipeline.Run._extract

    def watched(self, resource):
        if resource.get("id") == "o3":
            extracted_ahead.set()
        return extract(self, resource)

    monkeypatch.setattr(pipeline.Run, "_extract", watched)
    seen_while_writing: list[bool] = []

    def on_write():
        if not seen_while_writing:  # the first write: page 1's, with page 2 already read
            # Waits for the main thread; 30 s only keeps a broken overlap from hanging the test.
            seen_while_writing.append(extracted_ahead.wait(30))

    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        server = FakeServer(mock, on_write=on_write)
        server.pages = [[observation("o1", "a", 0.4, stamp(1)), observation("o2", "b", 0.9, stamp(2))],
                        [observation("o3", "c", 0.3, stamp(3))]]
        code, summary = run_once(config(tmp_path), tmp_path / "s.sqlite3", "r1")
        assert code == 0 and summary.complete
        assert seen_while_writing == [True]
        assert [len(bundle["entry"]) for bundle in posted(mock)] == [2, 1]  # page 1's Flags, then page 2's


class StopOnPage(FakeServer):
    """Asks for a stop when page `number` is searched: the signal arrives while a batch is open."""

    def __init__(self, mock, stop: Stop, number: int):
        self.stop, self.number = stop, number
        super().__init__(mock)

    def search(self, request):
        if f"page={self.number}" in request.url:
            self.stop.set()
        return super().search(request)


def test_a_stop_in_an_open_batch_rolls_it_back_and_the_rerun_writes_it_once(tmp_path):
    path = tmp_path / "s.sqlite3"
    pages = [[observation("o1", "a", 0.4, stamp(1))], [observation("o2", "a", 0.8, stamp(2))],
             [observation("o3", "b", 0.3, stamp(3))]]
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        stop = Stop()
        server = StopOnPage(mock, stop, 1)  # page 2 is asked for while page 1 waits in its batch
        server.pages = pages
        code, summary = run_once(config(tmp_path), path, "r1", stop=stop)
        assert code == 6 and summary.stopped and not summary.complete
        assert posted(mock) == []  # nothing is sent after a stop
        state = State.open(path)
        assert state.ledger("o1") is None  # the open batch rolled back
        assert state.watermark() is None and state.resume_point() is not None
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        server = FakeServer(mock)
        server.pages = pages
        code, summary = run_once(config(tmp_path), path, "r2")
        assert code == 0 and summary.complete
        subjects = [e["resource"]["subject"]["reference"] for bundle in posted(mock) for e in bundle["entry"]]
        assert sorted(subjects) == ["Patient/a", "Patient/b"]  # a's two pages in one batch: one Flag write


class HoldsOtherFlags(FakeServer):
    """A server holding a Flag of ours the state does not know: each newly flagged patient is looked up."""

    def __init__(self, mock):
        other = {"resourceType": "Flag", "id": "f-x", "status": "active", "code": {"text": "x"},
                 "identifier": [{"system": "https://hospital.example/fhir/anc-adapter/Flag", "value": "x/o-x"}],
                 "subject": {"reference": "Patient/x"}}
        mock.get(re.compile(rf"{re.escape(BASE)}/Flag\b.*"),
                 json={"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": other}]})
        super().__init__(mock)


def test_lookups_and_writes_never_queue_behind_a_page_fetch(tmp_path):
    """Sekmet serves one request at a time: the page after the one read ahead is fetched only once the batch
    before it was written, so the Flag lookups and the write meet no page fetch in flight."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        server = HoldsOtherFlags(mock)
        server.pages = [[observation(f"o{k}", f"p{k}", 0.4, stamp(k))] for k in range(4)]
        code, summary = run_once(config(tmp_path), tmp_path / "s.sqlite3", "r1")
        assert code == 0 and summary.complete and summary.pages == 4
        order = []
        for call in mock.calls:
            url = call.request.url
            if call.request.method == "POST":
                order.append("write")
            elif "subject=" in url:
                order.append("lookup")
            elif "/Observation" in url and "_elements=id" not in url:
                order.append(f"page{int(parse_qs(urlsplit(url).query).get('page', ['0'])[0]) + 1}")
        # Page k+2 is fetched after batch k's lookup and write, never between them.
        assert order == ["page1", "page2", "lookup", "write", "page3", "lookup", "write", "page4",
                         "lookup", "write", "lookup", "write"], order


class Counting(FakeServer):
    """Gives Bundle.total on every page, as Sekmet does."""

    def search(self, request):
        status, headers, body = super().search(request)
        answer = json.loads(body)
        answer["total"] = sum(len(p) for p in self.pages)
        return status, headers, json.dumps(answer)


def test_a_backlog_is_batched_by_size_and_a_routine_poll_page_by_page(tmp_path, monkeypatch):
    """Pages of different patients: written page by page in a small pass; in a search the server says
    matches at least a batch's worth of counts (a backlog), by size."""
    monkeypatch.setattr(pipeline, "_BATCH_OBSERVATIONS", 4)
    for pages, writes in ((3, 3), (4, 1), (6, 2)):  # total 3: a routine poll; 4 and 6: backlogs
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            server = Counting(mock)
            server.pages = [[observation(f"o{k}", f"p{k}", 0.4, stamp(k))] for k in range(pages)]
            code, summary = run_once(config(tmp_path / str(pages)), tmp_path / f"{pages}.sqlite3", "r1")
            assert code == 0 and summary.complete and summary.pages == pages
            assert len(posted(mock)) == writes, pages


def test_a_large_batch_is_planned_and_sent_a_part_at_a_time_the_next_planned_during_the_write(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_WRITES_PER_PART", 2)
    planned: list[str] = []
    plan = pipeline.Run._plan

    def watched(self, patient_id):
        planned.append(patient_id)
        return plan(self, patient_id)

    monkeypatch.setattr(pipeline.Run, "_plan", watched)
    planned_while_writing: list[list[str]] = []

    def on_write():
        # The first part (p0, p1) is in flight: the second (p2, p3) is planned meanwhile, not the third.
        if not planned_while_writing:
            for _ in range(300):  # the main thread plans the next part now; 30 s only guards against a hang
                if len(planned) >= 4:
                    break
                threading.Event().wait(0.1)
            planned_while_writing.append(list(planned))

    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        server = FakeServer(mock, on_write=on_write)
        server.pages = [[observation(f"o{k}", f"p{k}", 0.4, stamp(k)) for k in range(6)]]
        code, summary = run_once(config(tmp_path), tmp_path / "s.sqlite3", "r1")
        assert code == 0 and summary.complete and summary.created == 6
        assert [sorted(e["resource"]["subject"]["reference"] for e in b["entry"]) for b in posted(mock)] == [
            ["Patient/p0", "Patient/p1"], ["Patient/p2", "Patient/p3"], ["Patient/p4", "Patient/p5"]]
        assert planned_while_writing == [["p0", "p1", "p2", "p3"]]
