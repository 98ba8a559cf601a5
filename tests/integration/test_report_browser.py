"""`report --html` end to end: a real FHIR server, a dry run over history, a live run, and the report
opened in headless Chromium (Debian's chromium + chromium-driver), checked as a reviewer sees it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from adapter.cli import main
from adapter.state import State
from browser import Request, chromium, console_errors, missing, requests_made
from builders import anc, patient
from context_builders import atc, medication_administration, temperature

pytestmark = pytest.mark.integration

IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")


@pytest.fixture(scope="module")
def browser():
    absent = missing()
    if absent:
        why = "headless Chromium is not installed: " + ", ".join(absent) + \
            " (apt-get install -y chromium chromium-driver; .ci/run installs them)"
        if IN_CI:
            pytest.fail(why + " — CI must run the browser tests, not skip them")
        pytest.skip(why)
    with chromium() as driver:
        yield driver


def cli(tmp_path: Path, server, *args: str) -> int:
    return main([*args, "--fhir-url", server.base_url, "--state", str(tmp_path / "state.sqlite3"),
                 "--log-format", "json"])


def load_history(server) -> None:
    server.load(
        patient("p-severe"), anc("o-severe-1", "p-severe", 2.1, effective="2026-09-01T08:00:00Z"),
        anc("o-severe-2", "p-severe", 0.3, effective="2026-09-03T08:00:00Z"),
        anc("o-severe-3", "p-severe", 0.2, effective="2026-09-05T08:00:00Z"),
        patient("p-moderate"), anc("o-moderate", "p-moderate", 800, unit="/uL", effective="2026-09-04T08:00:00Z"),
        patient("p-normal"), anc("o-normal", "p-normal", 2.5, effective="2026-09-02T08:00:00Z"),
        patient("p-quarantined"), anc("o-quarantined", "p-quarantined", 1.0, unit="mmol/L",
                                      effective="2026-09-02T08:00:00Z"),
    )


def seen_in_browser(driver, path: Path) -> dict:
    """Open the report as a reviewer would and read what is on the screen."""
    from selenium.webdriver.common.by import By

    url = path.resolve().as_uri()
    driver.get(url)
    sections = driver.find_elements(By.CSS_SELECTOR, "section.patient")
    banner = driver.find_element(By.ID, "phi-banner")
    seen = {
        # Even an attempt the policy would block counts: the report must not try.
        "requests": [r.url for r in requests_made(driver) if not r.url.startswith("data:")],
        "url": url,
        "errors": console_errors(driver),
        "banner": banner.text if banner.is_displayed() else "",
        "banner_top": banner.location["y"],
        "dry_run": bool(driver.find_elements(By.ID, "dry-run")),
        "patients": {},
        "body": driver.find_element(By.TAG_NAME, "body").text,
    }
    for section in sections:
        patient_id = section.find_element(By.CSS_SELECTOR, "code.patient-id")
        charts = section.find_elements(By.CSS_SELECTOR, "svg.timeline")
        seen["patients"][patient_id.text] = [
            c.size["width"] > 300 and c.size["height"] > 100 and c.is_displayed() for c in charts
        ] if patient_id.is_displayed() else None
    return seen


def test_go_live_review_then_live_report_in_a_real_browser(fhir_server, tmp_path, browser):
    load_history(fhir_server)
    live_path, review_path = tmp_path / "state.sqlite3", tmp_path / "state.review.sqlite3"

    # Before go-live: a dry run over the history, then the report — of what the adapter would write.
    assert cli(tmp_path, fhir_server, "run", "--dry-run", "--since", "2026-08-01T00:00:00Z") == 0
    assert fhir_server.flags() == []
    live = State.open_readonly(live_path)
    assert (live.watermark(), live.runs(), live.all_readings()) == (None, [], [])
    assert stat.S_IMODE(review_path.stat().st_mode) == 0o600
    planned = [(p["patient_id"], p["resource_type"], p["action"], p["status"])
               for p in State.open_readonly(review_path).planned()]
    assert planned == [("p-moderate", "Flag", "create", "active"), ("p-severe", "Flag", "create", "active")]
    dry_report = tmp_path / "review.html"
    assert cli(tmp_path, fhir_server, "report", "--html", str(dry_report)) == 0
    assert stat.S_IMODE(dry_report.stat().st_mode) == 0o600

    seen = seen_in_browser(browser, dry_report)
    assert seen["patients"] == {"p-severe": [True], "p-moderate": [True]}  # one chart each, on screen
    assert seen["requests"] == [seen["url"]]  # the file itself, and nothing else
    assert seen["errors"] == []
    assert "patient data" in seen["banner"] and seen["banner_top"] < 50
    assert seen["dry_run"]
    assert "o-quarantined" in seen["body"] and "unknown-unit" in seen["body"]
    assert "p-normal" not in seen["body"]
    assert "Severe neutropenia: ANC 200 cells/µL on 2026-09-05" in seen["body"]  # the Flag it would write

    # Live: the Flags are written, and the default report now shows the live state.
    assert cli(tmp_path, fhir_server, "run", "--since", "2026-08-01T00:00:00Z") == 0
    assert len(fhir_server.flags()) == 2
    live_report = tmp_path / "live.html"
    assert cli(tmp_path, fhir_server, "report", "--html", str(live_report)) == 0
    seen = seen_in_browser(browser, live_report)
    assert seen["patients"] == {"p-severe": [True], "p-moderate": [True]}
    assert seen["requests"] == [seen["url"]] and seen["errors"] == []
    assert not seen["dry_run"]
    assert "episode 1, open: Flag active" in seen["body"]

    # A new dry run starts again from the live state: everything is written, nothing would change.
    assert cli(tmp_path, fhir_server, "run", "--dry-run", "--since", "2026-08-01T00:00:00Z") == 0
    assert State.open_readonly(review_path).planned() == []

    # The review stays available on request, and a window narrows what is shown.
    again = tmp_path / "again.html"
    assert cli(tmp_path, fhir_server, "report", "--dry-run", "--html", str(again),
               "--since", "2026-09-04T00:00:00Z", "--until", "2026-09-05T00:00:00Z") == 0
    seen = seen_in_browser(browser, again)
    assert seen["dry_run"] and list(seen["patients"]) == ["p-moderate"]


def test_the_recorder_sees_a_request_and_the_policy_blocks_it(tmp_path, browser):
    """The no-request check above must be able to fail: a page that loads an image is caught, and the
    same image under the report's Content-Security-Policy is never requested."""
    from adapter.outputs.report import CSP

    image = '<img src="http://127.0.0.1:9/leak.png">'
    open_page = tmp_path / "open.html"
    open_page.write_text(f"<!DOCTYPE html><html><body>{image}</body></html>")
    guarded = tmp_path / "guarded.html"
    guarded.write_text(f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="{CSP}">'
                       f"</head><body>{image}</body></html>")
    browser.get(open_page.resolve().as_uri())
    assert Request("http://127.0.0.1:9/leak.png", None) in requests_made(browser)
    console_errors(browser)
    browser.get(guarded.resolve().as_uri())
    assert requests_made(browser) == [Request(guarded.resolve().as_uri(), None),
                                      Request("http://127.0.0.1:9/leak.png", "csp")]
    assert any("Content Security Policy" in message for message in console_errors(browser))


@pytest.mark.parametrize("args, message", [
    (["run", "--review-state", "x.sqlite3"], "only with --dry-run"),
    (["report", "--html", "r.html"], "does not exist"),
    (["report", "--dry-run", "--html", "r.html"], "no review state"),
    (["report", "--html", "r.html", "--since", "2026-02-01T00:00:00Z", "--until", "2026-01-01T00:00:00Z"],
     "later than --since"),
])
def test_usage_errors_exit_2_and_name_the_option(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--fhir-url", "http://127.0.0.1:9/fhir", "--state", str(tmp_path / "s.sqlite3"),
                 "--log-format", "text"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_a_febrile_patient_after_chemotherapy_shows_the_fever_and_the_chemotherapy_in_its_chart(
        fhir_server, tmp_path, browser):
    from selenium.webdriver.common.by import By

    fhir_server.load(
        patient("p-fn"), anc("o-fn-1", "p-fn", 2.4, effective="2026-09-01T08:00:00Z"),
        anc("o-fn-2", "p-fn", 0.25, effective="2026-09-10T08:00:00Z"),
        temperature("t-fn", "p-fn", 38.6, "2026-09-10T10:00:00Z"),
        medication_administration("ma-fn", "p-fn", "2026-08-31T09:00:00Z", atc("L01AA01", "cyclophosphamide")),
        patient("p-sev"), anc("o-sev", "p-sev", 0.3, effective="2026-09-10T08:00:00Z"),  # severe, no context
    )
    assert cli(tmp_path, fhir_server, "run", "--since", "2026-08-01T00:00:00Z") == 0
    [flag] = fhir_server.flags("p-fn")
    assert flag["code"]["text"].startswith("Febrile neutropenia: temperature 38.6 °C")
    path = tmp_path / "live.html"
    assert cli(tmp_path, fhir_server, "report", "--html", str(path)) == 0
    seen = seen_in_browser(browser, path)
    assert seen["requests"] == [seen["url"]] and seen["errors"] == []
    charts = {}
    for section in browser.find_elements(By.CSS_SELECTOR, "section.patient"):
        chart = section.find_element(By.CSS_SELECTOR, "svg.timeline")
        box = chart.rect
        labels = {}
        for text in chart.find_elements(By.TAG_NAME, "text"):
            inside = box["x"] <= text.rect["x"] and text.rect["x"] + text.rect["width"] <= box["x"] + box["width"] + 1
            labels[text.text] = text.is_displayed() and inside
        charts[section.find_element(By.CSS_SELECTOR, "code.patient-id").text] = (
            section.find_element(By.TAG_NAME, "h3").text, labels,
            len(chart.find_elements(By.CSS_SELECTOR, "line.context")))
    heading, labels, lines = charts["p-fn"]
    assert labels.get("38.6 °C") and labels.get("cyclophosphamide")  # on screen, inside the chart
    assert lines == 2
    assert "febrile neutropenia in episode 1" in heading
    assert any(label.startswith("episode 1, open, febrile") for label in labels)
    heading, labels, lines = charts["p-sev"]
    assert lines == 0 and "febrile" not in heading
