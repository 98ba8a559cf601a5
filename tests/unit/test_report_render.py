"""The review report renderer: state rows in, the SVG and HTML a reviewer sees out; escaping; 0600."""

from __future__ import annotations

import html
import math
import os
import re
import stat
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest

from adapter import mappings as mappings_module
from adapter.clinical import assess
from adapter.model import AgeBand, Classification, Count, Grade, Quarantine, Reading, Reason
from adapter.outputs import report
from adapter.outputs.report import ContextMark
from adapter.state import ContextFact, State, Written

THRESHOLDS = mappings_module.load(None).thresholds
NOW = "2026-11-26T00:00:00+00:00"
DAY0 = datetime(2026, 11, 1, 8, tzinfo=timezone.utc)
HOSTILE = '<script>alert("x")</script>&\'"><img src=http://127.0.0.1:9/leak>'


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text, as a browser's parser sees them."""

    def __init__(self, document: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(document)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k.rstrip("_")) == v for k, v in attrs.items())]


def graded(state: State, patient_id: str, number: int, anc: float, grade: Grade, days: float,
           band: AgeBand = AgeBand.ADULT, at_least: bool = False, lln: float | None = None,
           notes: tuple[str, ...] = ()) -> str:
    observation_id = f"{patient_id}-o{number}"
    reading = Reading(observation_id, "1", "final", patient_id, DAY0 + timedelta(days=days),
                      Count(anc, "<" if at_least else ""), lln_per_ul=lln)
    state.record_classified(reading, Classification(grade, at_least, band, notes), NOW)
    return observation_id


def flag(state: State, patient_id: str, identifier: str, status: str, evidence: tuple[str, ...]) -> None:
    state.record_written(Written("Flag", identifier, patient_id, status, "hash", "srv", evidence), NOW)


def rendered(state: State, context=None, rules=None, **window) -> tuple[report.ReportData, str]:
    data = report.collect(state, "state.sqlite3", THRESHOLDS, rules=rules, **window)
    return data, report.render(data, generated=datetime(2026, 11, 26, tzinfo=timezone.utc), context=context)


def patient_sections(document: str) -> dict[str, str]:
    """patient id (unescaped) -> the HTML of its section."""
    sections = {}
    for match in re.finditer(r'<section class="patient" id="patient-\d+" data-patient="([^"]*)">(.*?)</section>',
                             document, re.S):
        (attrs,) = Elements(f'<i data-patient="{match.group(1)}">').all("i")
        sections[attrs["data-patient"]] = match.group(2)
    return sections


@pytest.fixture
def state(tmp_path):
    return State.open(tmp_path / "state.sqlite3")


def test_every_flagged_patient_gets_one_timeline_with_its_counts_episodes_and_flags(state):
    with state.transaction():
        # A closed episode (severe, recovered) and an open one (mild); the normal-only patient is not flagged.
        ids = [graded(state, "p1", n, anc, grade, day) for n, (anc, grade, day) in enumerate(
            [(2500, Grade.NORMAL, 0), (400, Grade.SEVERE, 2), (900, Grade.MODERATE, 4), (1800, Grade.NORMAL, 6),
             (1300, Grade.MILD, 8)])]
        flag(state, "p1", "p1/first", "inactive", (ids[1], ids[2]))
        flag(state, "p1", "p1/second", "active", (ids[4],))
        graded(state, "p2", 1, 800, Grade.MODERATE, 1)
        graded(state, "p3", 1, 3000, Grade.NORMAL, 1)
    data, document = rendered(state)
    sections = patient_sections(document)
    assert list(sections) == ["p1", "p2"]  # most severe first; p3 only normal
    p1 = Elements(sections["p1"])
    assert len(p1.all("svg", class_="timeline")) == 1
    assert len(p1.all("circle", class_="count")) == 5
    assert len(p1.all("rect", class_="episode")) == 2
    assert len(p1.all("line", class_="threshold")) == 3  # adult: 1500, 1000, 500
    text = " ".join(p1.text)
    assert "episode 1: Flag inactive" in text and "episode 2, open: Flag active" in text
    assert "< 1500 mild" in text and "< 500 severe" in text
    assert [p.worst for p in data.flagged] == [Grade.SEVERE, Grade.MODERATE]
    assert sorted(data.new_episodes.values()) == [["p1"], ["p1"], ["p2"]]


@pytest.mark.parametrize("band, grade, lln, lines", [
    (AgeBand.ADULT, Grade.MILD, None, ["1500", "1000", "500"]),
    (AgeBand.INFANT, Grade.MODERATE, None, ["1000", "500"]),  # no mild grade under 1 year
    (AgeBand.NEONATE, Grade.SEVERE, None, ["1000", "500"]),
    (AgeBand.ADULT, Grade.CTCAE_2, 2000.0, ["1500", "1000", "500", "2000"]),  # grade 1 below the LLN
    (AgeBand.ADULT, Grade.CTCAE_2, 1200.0, ["1500", "1000", "500"]),  # LLN under grade 2's bound: no grade 1
])
def test_threshold_lines_follow_the_readings_band_and_profile(state, band, grade, lln, lines):
    with state.transaction():
        graded(state, "p", 1, 700, grade, 0, band=band, lln=lln)
    _, document = rendered(state)
    titles = re.findall(r'<line class="threshold"[^>]*><title>[^<]* below (\d+) cells', document)
    assert sorted(titles, key=int) == sorted(lines, key=int)


def test_a_first_birthday_moves_the_threshold_lines_where_the_band_changes(state):
    with state.transaction():
        graded(state, "baby", 1, 900, Grade.MODERATE, 0, band=AgeBand.INFANT)
        graded(state, "baby", 2, 1200, Grade.MILD, 10, band=AgeBand.ADULT)
    _, document = rendered(state)
    lines = Elements(document).all("line", class_="threshold")
    assert len(lines) == 2 + 3
    infant_end = {line["x2"] for line in lines[:2]}
    adult_start = {line["x1"] for line in lines[2:]}
    assert infant_end == adult_start  # both at the first adult reading


def test_a_comparator_result_is_drawn_hollow(state):
    with state.transaction():
        graded(state, "p", 1, 500, Grade.MODERATE, 0, at_least=True)
    _, document = rendered(state)
    [point] = Elements(document).all("circle", class_="count")
    assert point["fill"] == "#fff"


def test_hostile_ids_and_text_are_escaped_everywhere(state):
    with state.transaction():
        observation_id = graded(state, HOSTILE, 1, 300, Grade.SEVERE, 0, notes=(HOSTILE,))
        flag(state, HOSTILE, HOSTILE, "active", (observation_id,))
        state.quarantine(HOSTILE, "1", HOSTILE, Quarantine(Reason.UNKNOWN_UNIT, HOSTILE),
                         {"id": HOSTILE, "effectiveDateTime": HOSTILE}, NOW)
    _, document = rendered(state, context=lambda p: [ContextMark(DAY0, HOSTILE, HOSTILE)])
    parsed = Elements(document)
    assert not parsed.all("script") and not parsed.all("img")
    assert "<script" not in document.lower()
    assert list(patient_sections(document)) == [HOSTILE]  # the id survives, as text, intact
    assert sum(HOSTILE in chunk for chunk in parsed.text) >= 5


def test_context_marks_are_drawn_only_when_given(state):
    with state.transaction():
        graded(state, "p", 1, 300, Grade.SEVERE, 1)
    marks = {"p": [ContextMark(DAY0, "T 38.6 °C", "fever"),
                   ContextMark(DAY0 - timedelta(days=3), "cyclophosphamide", "chemotherapy",
                               until=DAY0 - timedelta(days=2))]}
    _, plain = rendered(state)
    _, marked = rendered(state, context=lambda patient_id: marks.get(patient_id, []))
    assert 'class="context"' not in plain
    parsed = Elements(marked)
    assert len(parsed.all("line", class_="context")) == 2
    assert len(parsed.all("rect", class_="context")) == 1  # the span
    assert "T 38.6 °C" in parsed.text and "cyclophosphamide" in parsed.text


def test_the_window_selects_counts_and_patients_by_effective_time(state):
    with state.transaction():
        graded(state, "early", 1, 300, Grade.SEVERE, 0)
        graded(state, "late", 1, 800, Grade.MODERATE, 20)
        graded(state, "late", 2, 700, Grade.MODERATE, 1)
    data, document = rendered(state, since=DAY0 + timedelta(days=10))
    assert list(patient_sections(document)) == ["late"]
    [late] = data.flagged
    assert len(late.shown) == 1 and len(late.readings) == 2  # episodes still from every count
    assert data.grades == {"moderate": 1}


def test_the_banner_and_the_content_security_policy_come_first(state):
    _, document = rendered(state)
    head = document[:document.index("<style>")]
    assert f'<meta http-equiv="Content-Security-Policy" content="{report.CSP.replace(chr(39), "&#x27;")}">' in head
    assert "default-src &#x27;none&#x27;" in head
    body = document[document.index("<body>"):]
    assert body.index('id="phi-banner"') < body.index("<h1>")
    assert "contains patient data" in body[:body.index("<h1>")]
    assert "No flagged patients" in document


def test_the_file_is_written_0600_also_over_an_existing_wider_file(tmp_path):
    fresh = tmp_path / "new" / "report.html"
    report.write(fresh, "<p>one</p>")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    existing = tmp_path / "old.html"
    existing.write_text("x" * 1000)
    os.chmod(existing, 0o644)
    report.write(existing, "<p>two</p>")
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600
    assert existing.read_text() == "<p>two</p>"


def test_a_symbolic_link_in_place_of_the_report_is_refused(tmp_path):
    from adapter.errors import ConfigError
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("keep")
    (tmp_path / "report.html").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="--html"):
        report.write(tmp_path / "report.html", "<p>patient data</p>")
    assert elsewhere.read_text() == "keep"


def test_a_dry_run_review_copy_records_plans_and_leaves_the_live_state_alone(tmp_path):
    live_path = tmp_path / "state.sqlite3"
    live = State.open(live_path)
    with live.transaction():
        live.set_watermark("2026-11-01T00:00:00+00:00")
        flag(live, "p", "p/known", "active", ("p-o0",))
    review = live.review_copy(tmp_path / "state.review.sqlite3", "run1", NOW, "2026-08-01T00:00:00+00:00", None)
    assert stat.S_IMODE((tmp_path / "state.review.sqlite3").stat().st_mode) == 0o600
    with review.transaction():
        actions = [
            review.record_planned("run1", Written("Flag", "p/known", "p", "inactive", "h", None), {}, NOW),
            review.record_planned("run1", Written("Flag", "p/new", "p", "active", "h", None), {}, NOW),
            review.record_planned("run1", Written("Flag", "p/old", "p", "entered-in-error", "h", None), {}, NOW),
        ]
        review.set_watermark("2026-11-20T00:00:00+00:00")
    assert actions == ["update", "create", "withdraw"]
    assert review.review() == {"run_id": "run1", "started": NOW, "since": "2026-08-01T00:00:00+00:00", "until": ""}
    reopened = State.open_readonly(live_path)
    assert reopened.watermark() == "2026-11-01T00:00:00+00:00"
    assert reopened.planned() == [] and reopened.review() is None
    assert [p["action"] for p in State.open_readonly(tmp_path / "state.review.sqlite3").planned()] == \
        ["update", "create", "withdraw"]


def test_a_review_copy_is_never_the_live_file(tmp_path):
    live = State.open(tmp_path / "state.sqlite3")
    from adapter.errors import ConfigError
    with pytest.raises(ConfigError, match="review-state"):
        live.review_copy(tmp_path / "state.sqlite3", "run1", NOW, None, None)


def test_a_dry_run_report_says_would_and_lists_the_planned_flags(tmp_path):
    live = State.open(tmp_path / "state.sqlite3")
    review = live.review_copy(tmp_path / "review.sqlite3", "run1", NOW, "2026-10-01T00:00:00+00:00", None)
    with review.transaction():
        evidence = graded(review, "p", 1, 300, Grade.SEVERE, 0)
        item = Written("Flag", "p/1", "p", "active", "h", None, (evidence,))
        review.record_planned("run1", item, {"code": {"text": "Severe neutropenia: ANC 300"}}, NOW)
        review.record_written(item, NOW)
    data, document = rendered(review)
    assert data.review is not None
    parsed = Elements(document)
    assert parsed.all("div", id="dry-run")
    assert "Dry run: nothing here was sent to the FHIR server." in parsed.text
    assert "Severe neutropenia: ANC 300" in parsed.text
    assert "episode 1, open: Flag active (dry run would create)" in " ".join(parsed.text)


def test_a_readonly_open_refuses_a_missing_file_and_changes_nothing(tmp_path):
    from adapter.errors import ConfigError
    with pytest.raises(ConfigError, match="does not exist"):
        State.open_readonly(tmp_path / "missing.sqlite3")
    path = tmp_path / "state.sqlite3"
    State.open(path).db.close()
    before = Path(path).read_bytes()
    readonly = State.open_readonly(path)
    with pytest.raises(Exception, match="readonly"):
        readonly.db.execute("INSERT INTO meta VALUES ('x', 'y')")
    assert Path(path).read_bytes() == before


# --- clinical context from the state, assessed with run's rules ------------------------------------------

RULES = assess.Rules(profile="clinical", thresholds=THRESHOLDS)


def fact(state: State, patient_id: str, kind: str, resource: str, when: datetime, value: float | None = None,
         name: str = "") -> None:
    resource_type, resource_id = resource.split("/")
    state.record_context(ContextFact(resource_type, resource_id, "1", patient_id, kind, "final", when, value, name),
                         NOW)


def marks_of(data: report.ReportData, patient_id: str) -> list[tuple[str, str]]:
    return [(m.kind, m.label) for m in report.context_marks(data)(patient_id)]


def test_fever_chemotherapy_and_projection_marks_come_from_the_stored_facts(state):
    with state.transaction():
        graded(state, "fn", 1, 320, Grade.SEVERE, 10)
        fact(state, "fn", "temperature", "Observation/t1", DAY0 + timedelta(days=10, hours=2), 38.6)
        fact(state, "fn", "temperature", "Observation/t2", DAY0 + timedelta(days=10, hours=5), 37.2)  # no fever
        fact(state, "fn", "temperature", "Observation/t3", DAY0 + timedelta(days=3), 39.0)  # days from any count
        fact(state, "fn", "chemotherapy", "MedicationAdministration/m1", DAY0, name="cyclophosphamide")
        # A fall from 900 to 600 in 12 hours: projected below 500 a few hours later.
        graded(state, "pr", 1, 900, Grade.MODERATE, 10)
        graded(state, "pr", 2, 600, Grade.MODERATE, 10.5)
    data, document = rendered(state, rules=RULES)
    assert marks_of(data, "fn") == [("chemotherapy", "cyclophosphamide"), ("fever", "38.6 °C")]
    [(kind, label)] = marks_of(data, "pr")
    hours = 12 * math.log(500 / 600) / math.log(600 / 900)  # the same ratio per hour continues
    crossing = (DAY0 + timedelta(days=10.5, hours=hours)).strftime("%m-%d %H:%M")
    assert (kind, label) == ("projection", f"projected < 500 by {crossing}")
    [projection] = report.context_marks(data)("pr")
    assert projection.until is not None and projection.until > projection.at
    # Recomputed with the assessment core: the severe count with a fever is febrile neutropenia.
    assert [p.febrile_episodes for p in data.flagged if p.patient_id == "fn"] == [frozenset({1})]
    sections = patient_sections(report.render(data, generated=datetime(2026, 11, 26, tzinfo=timezone.utc),
                                              context=report.context_marks(data)))
    fn = " ".join(Elements(sections["fn"]).text)
    assert "febrile neutropenia in episode 1" in fn and "episode 1, open, febrile" in fn
    assert "38.6 °C" in fn and "cyclophosphamide" in fn and "37.2" not in fn and "39.0" not in fn
    assert "febrile" not in " ".join(Elements(sections["pr"]).text)
    # Without the rules (or the context function) nothing is marked, as before.
    plain, _ = rendered(state)
    assert marks_of(plain, "fn") == [] and all(not p.febrile_episodes for p in plain.flagged)
    assert 'class="context"' not in document  # `rendered` passes no context function


def test_a_temperature_below_38_3_is_never_labelled_38_3(state):
    # 100.9 °F is 38.28 °C: no single-reading fever (>= 38.3). Rounded to one decimal the mark would read
    # "38.3 °C" beside a Flag that is rightly not febrile, and a reviewer would see a missed fever.
    with state.transaction():
        graded(state, "fn", 1, 320, Grade.SEVERE, 10)
        state.record_context(ContextFact("Observation", "t1", "1", "fn", "temperature", "final",
                                         DAY0 + timedelta(days=10, hours=2), 38.277778, "100.9 °F"), NOW)
    data, _ = rendered(state, rules=RULES)
    [(kind, label)] = marks_of(data, "fn")
    assert "38.3" not in label and label.startswith("38.2") and "100.9 °F" in label
    assert [p.febrile_episodes for p in data.flagged if p.patient_id == "fn"] == [frozenset()]


def test_a_site_marked_duffy_null_patient_is_graded_and_drawn_against_the_floor(state):
    with state.transaction():
        graded(state, "dn", 1, 1300, Grade.MILD, 1)  # stored as graded before the marker was read
        graded(state, "dn", 2, 1100, Grade.MILD, 3)
        fact(state, "dn", "duffy-null", "Condition/c1", None)
        graded(state, "ok", 1, 1300, Grade.MILD, 1)  # unmarked: mild as for anyone
    data, document = rendered(state, rules=RULES)
    dn = next(p for p in data.flagged if p.patient_id == "dn")
    assert [r.grade for _, r in dn.shown] == [Grade.NORMAL, Grade.MILD] and dn.duffy_null_floor == 1210
    section = patient_sections(document)["dn"]
    titles = re.findall(r'<line class="threshold"[^>]*><title>([^<]*)</title>', section)
    assert sorted(titles) == ["mild below 1210 cells/µL", "moderate below 1000 cells/µL", "severe below 500 cells/µL"]
    assert "Site-marked Duffy-null threshold: counts from 1210 cells/µL up are normal" in " ".join(Elements(section).text)
    assert "1210" not in patient_sections(document)["ok"]
    # A marked patient whose counts are all at or above the floor is not flagged at all.
    with state.transaction():
        fact(state, "only-ok", "duffy-null", "Condition/c2", None)
        graded(state, "only-ok", 1, 1300, Grade.MILD, 1)
    again, _ = rendered(state, rules=RULES)
    assert "only-ok" not in [p.patient_id for p in again.flagged]


def test_mark_labels_close_in_time_take_separate_rows_and_stay_inside_the_chart(state):
    with state.transaction():
        graded(state, "p", 1, 300, Grade.SEVERE, 0)
        graded(state, "p", 2, 250, Grade.SEVERE, 5)
    marks = [ContextMark(DAY0 + timedelta(hours=1), "38.6 °C", "fever"),
             ContextMark(DAY0 + timedelta(hours=3), "cyclophosphamide", "chemotherapy"),
             ContextMark(DAY0 + timedelta(days=5), "projected < 500 by 11-07 06:00", "projection")]
    _, document = rendered(state, context=lambda patient_id: marks)
    labels = {html.unescape(m.group(3)): (float(m.group(1)), float(m.group(2)), 'text-anchor="end"' in m.group(0))
              for m in re.finditer(r'<text x="([\d.]+)" y="([\d.]+)"[^>]*>([^<]*)</text>',
                                   patient_sections(document)["p"])
              if html.unescape(m.group(3)) in {mark.label for mark in marks}}
    assert labels["38.6 °C"][1] != labels["cyclophosphamide"][1]  # two hours apart: one above the other
    x, _, leftwards = labels["projected < 500 by 11-07 06:00"]
    assert leftwards and x <= 760  # at the right edge: written leftwards from its line
