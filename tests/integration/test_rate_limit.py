"""[fhir] max_requests_per_s on a whole run against the real server, behind a front that notes when each
request arrives. Only the limiter's lower bound is asserted (N requests at rate r with a burst of 1 cannot
all arrive within (N - 1) / r seconds), never an upper bound: that holds on any machine, however slow."""

from __future__ import annotations

import threading
import time

import pytest

import fronts
from adapter.cli import main
from builders import anc, patient
from fronts import Front

pytestmark = pytest.mark.integration


@pytest.fixture
def arrivals(monkeypatch):
    """When each request reached the front (monotonic clock), in order of arrival."""
    times: list[float] = []
    lock = threading.Lock()
    handle = fronts._Handler._handle

    def noted(self) -> None:
        with lock:
            times.append(time.monotonic())
        handle(self)

    monkeypatch.setattr(fronts._Handler, "_handle", noted)
    return times


def test_a_run_keeps_to_max_requests_per_s(fhir_server, tmp_path, arrivals):
    fhir_server.load(*[r for n in range(6) for r in (patient(f"p{n}"), anc(f"o{n}", f"p{n}", 0.4))])
    rate = 20.0
    config = tmp_path / "adapter.toml"
    config.write_text(f"[fhir]\npage_size = 2\nmax_requests_per_s = {rate}\n")
    with Front(fhir_server.base_url) as front:
        assert main(["run", "--config", str(config), "--fhir-url", front.base_url,
                     "--state", str(tmp_path / "state.sqlite3"), "--log-format", "json"]) == 0
    assert len(fhir_server.flags()) == 6
    # metadata, four search pages (prefetched in the background), Flag lookups and a bundle per page
    assert len(arrivals) >= 8, arrivals
    assert arrivals[-1] - arrivals[0] >= (len(arrivals) - 1) / rate
