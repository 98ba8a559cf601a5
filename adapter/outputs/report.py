"""`anc-adapter report --html FILE`: one self-contained HTML review of what the adapter graded and wrote
(CONTRACT §9), read from the state alone. The charts are SVG of our own (`charts`). Every value from the
state is untrusted text and is escaped.

`collect` reads the state (I/O); `render` is pure (the time of generation is passed in); `write` creates
the file `0600`. Clinical context (fever, chemotherapy, …) reaches a patient's timeline through one seam:
`render(..., context=...)`, a function from a patient id to `ContextMark`s, drawn as vertical markers;
`context_marks(data)` is that function for what `collect` read when given the assessment rules: each
patient's counts and stored context facts go through the same assessment core as `run`
(adapter/clinical/assess.py), so the report shows the grades, febrile episodes and context `run` used."""

from __future__ import annotations

import html
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from adapter import context_extract
from adapter.clinical import assess
from adapter.clinical.context import duffy_null_thresholds, shown_celsius
from adapter.clinical.episodes import Episode, Graded, episodes
from adapter.errors import ConfigError
from adapter.mappings import Thresholds
from adapter.model import AgeBand, Grade
from adapter.outputs import charts
from adapter.outputs.charts import GRADE_COLOUR, MARK_COLOUR, OTHER_COLOUR, ContextMark, parse_instant, when_utc
from adapter.state import ContextFact, QuarantineEntry, State, Written

BANNER = ("This file contains patient data: FHIR patient ids with their neutrophil counts and dates. "
          "Keep it like the patient record: store it only where patient records may be kept, do not "
          "e-mail it, and delete it when the review is done.")
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

@dataclass(frozen=True)
class FlagView:
    """One of our Flags for a patient: recorded in state, and in a dry run what would be sent."""

    identifier: str
    status: str
    evidence: frozenset[str]
    action: str = ""  # dry run: create | update | withdraw; "" when it was written for real
    text: str = ""  # code.text of the resource the dry run would send


@dataclass(frozen=True)
class PatientView:
    patient_id: str
    readings: tuple[Graded, ...]  # every graded count we hold for the patient, by effective time
    episodes: tuple[Episode, ...]
    flags: tuple[FlagView, ...]
    shown: tuple[Graded, ...]  # the counts within the report's window
    marks: tuple[ContextMark, ...] = ()  # clinical context on the timeline (`context_marks`)
    febrile_episodes: frozenset[int] = frozenset()  # ordinals of the episodes with febrile neutropenia
    duffy_null_floor: float | None = None  # the site-marked threshold this patient's counts were graded by

    @property
    def worst(self) -> Grade:
        pool = self.shown or self.readings
        return max((r.grade for _, r in pool), key=lambda g: g.severity, default=Grade.NORMAL)

    def flag_for(self, episode: Episode) -> FlagView | None:
        matches = [f for f in self.flags if f.evidence & episode.evidence]
        return max(matches, key=lambda f: len(f.evidence & episode.evidence)) if matches else None


@dataclass(frozen=True)
class ReportData:
    source: str
    review: dict[str, str] | None  # the dry run this state holds; None for the live state
    since: datetime | None
    until: datetime | None
    runs: tuple[dict[str, Any], ...]
    grades: Counter[str]
    quarantine: tuple[tuple[QuarantineEntry, str], ...]  # with the Observation's effective time, or ""
    written: tuple[tuple[Written, str], ...]
    planned: tuple[dict[str, Any], ...]
    flagged: tuple[PatientView, ...]
    thresholds: Thresholds
    default_lln: float = 2000.0
    counts_read: int = 0
    new_episodes: dict[date, list[str]] = field(default_factory=dict)  # day -> patients whose episode began


def collect(state: State, source: str, thresholds: Thresholds, since: datetime | None = None,
            until: datetime | None = None, default_lln: float = 2000.0,
            rules: assess.Rules | None = None) -> ReportData:
    """Read what the report shows from one state file, in one read transaction (a consistent snapshot
    while a cron run may be writing). With `rules` (built as `run` builds them), each patient's counts
    are assessed with the clinical context stored for them: grades as `run` gave them (a site-marked
    Duffy-null threshold applied), febrile episodes, and the context marks of `context_marks`."""
    state.db.execute("BEGIN")
    try:
        readings = state.all_readings()
        written = state.all_written()
        planned = state.planned()
        runs = state.runs()
        quarantine = state.quarantined()
        effective_of = state.quarantined_effective()
        review = state.review()
        facts = {} if rules is None else \
            {patient_id: state.context_facts(patient_id) for patient_id in {g[0].patient_id for g in readings}}
    finally:
        state.db.execute("COMMIT")

    def within(moment: datetime | None) -> bool:
        if since is None and until is None:
            return True
        return moment is not None and (since is None or moment >= since) and (until is None or moment < until)

    by_patient: dict[str, list[Graded]] = defaultdict(list)
    for graded in readings:
        by_patient[graded[0].patient_id].append(graded)
    assessed: dict[str, assess.Assessment] = {}
    if rules is not None:
        for patient_id, rows in by_patient.items():
            assessed[patient_id] = assess.assess(rows, context_extract.context(facts[patient_id]), rules)
            by_patient[patient_id] = [c.graded for c in assessed[patient_id].counts]
        readings = [g for rows in by_patient.values() for g in rows]
    planned_flags = {(p["patient_id"], p["identifier"]): p for p in planned if p["resource_type"] == "Flag"}
    flags: dict[str, list[FlagView]] = defaultdict(list)
    for item, _ in written:
        if item.resource_type != "Flag":
            continue
        plan = planned_flags.get((item.patient_id, item.identifier))
        flags[item.patient_id].append(FlagView(
            item.identifier, item.status, frozenset(item.evidence), plan["action"] if plan else "",
            _text(plan["resource"]) if plan else ""))
    wanted = {p for p, rows in by_patient.items() if any(r.grade.abnormal and within(g.effective) for g, r in rows)}
    # A Flag the dry run would withdraw may have no count left to show; it is listed all the same.
    wanted |= {patient for (patient, _), plan in planned_flags.items() if plan["action"] == "withdraw"}
    wanted |= {item.patient_id for item, updated_at in written
               if item.resource_type == "Flag" and item.status == "entered-in-error"
               and within(parse_instant(updated_at))}
    flagged = []
    new_episodes: dict[date, list[str]] = defaultdict(list)
    for patient_id in sorted(wanted):
        rows = sorted(by_patient.get(patient_id, []), key=lambda g: (g[0].effective, g[0].observation_id))
        found = episodes(rows)
        for episode in found:
            if within(episode.start):
                new_episodes[episode.start.astimezone(timezone.utc).date()].append(patient_id)
        shown = tuple(g for g in rows if within(g[0].effective))
        extra: dict[str, Any] = {}
        if patient_id in assessed and rules is not None:
            extra = _assessed_view(assessed[patient_id], facts[patient_id], shown, rules, within)
        flagged.append(PatientView(patient_id, tuple(rows), tuple(found), tuple(flags.get(patient_id, [])),
                                   shown, **extra))
    flagged.sort(key=lambda p: (-p.worst.severity, p.patient_id))
    shown_quarantine = tuple(
        (entry, effective_of.get(entry.observation_id, ""))
        for entry in quarantine
        if within(parse_instant(effective_of.get(entry.observation_id, "")) or parse_instant(entry.first_seen))
    )
    in_window = [r for g, r in readings if within(g.effective)]
    return ReportData(
        source=source, review=review, since=since, until=until,
        runs=tuple(r for r in runs if within(parse_instant(r["started"]))),
        grades=Counter(r.grade.value for r in in_window),
        quarantine=shown_quarantine, written=tuple(written), planned=tuple(planned), flagged=tuple(flagged),
        thresholds=thresholds, default_lln=default_lln, counts_read=len(in_window),
        new_episodes=dict(new_episodes),
    )


def context_marks(data: ReportData) -> Callable[[str], Sequence[ContextMark]]:
    """The `render(context=...)` function for the marks `collect` found (none without its `rules`)."""
    marks = {patient.patient_id: patient.marks for patient in data.flagged}
    return lambda patient_id: marks.get(patient_id, ())


def _assessed_view(found: assess.Assessment, facts: list[ContextFact], shown: tuple[Graded, ...],
                   rules: assess.Rules, within: Callable[[datetime | None], bool]) -> dict[str, Any]:
    """What the assessment adds to a patient's view. Marks only for what concerns the counts shown, so a
    fever or a chemotherapy long before the window does not stretch the timeline:
    - fever: each temperature of at least the sustained-fever threshold (38.0 °C) within the febrile
      window (24 h) of a shown count, labelled with its value in °C;
    - chemotherapy: the record each shown count was assessed "after", labelled with the drug's name;
    - projection: from the count to the time it is projected to fall below 500, as a span.
    Labels carry values, drug names and times only: nothing that names the patient."""
    ids = {reading.observation_id for reading, _ in shown}
    counts = [c for c in found.counts if c.reading.observation_id in ids]
    febrile = rules.febrile_rules
    window = timedelta(hours=febrile.window_hours)
    marks: list[ContextMark] = []
    temperatures = context_extract.context(facts).temperatures
    for reading in sorted(temperatures, key=lambda t: (t.time, t.observation_id)):
        if reading.celsius >= febrile.sustained_celsius and \
                any(abs(reading.time - c.reading.effective) <= window for c in counts):
            recorded = f" ({reading.recorded})" if reading.recorded else ""
            marks.append(ContextMark(reading.time, f"{shown_celsius(reading.celsius)} °C{recorded}", "fever"))
    given = {c.chemotherapy.reference: c.chemotherapy for c in counts if c.chemotherapy is not None}
    marks += [ContextMark(chemo.time, chemo.name, "chemotherapy") for chemo in given.values()]
    for count in counts:
        if count.projection is not None:
            below_by = count.projection.below_by.astimezone(timezone.utc)
            marks.append(ContextMark(count.reading.effective, f"projected < 500 by {below_by:%m-%d %H:%M}",
                                     "projection", until=below_by))
    floors = {c.duffy_null_floor for c in counts if c.duffy_null_floor is not None}
    return {
        "marks": tuple(sorted(marks, key=lambda m: m.at)),
        "febrile_episodes": frozenset(e.episode.ordinal for e in found.episodes if e.fever is not None),
        "duffy_null_floor": max(floors) if floors else None,
    }


def write(path: Path, document: str) -> None:
    """Create or overwrite the report with mode 0600 (an existing file of wider mode is narrowed first:
    O_CREAT's mode applies only to a new file). A symbolic link at `path` is refused, not followed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as exc:
        raise ConfigError(f"--html: cannot write {path}: {exc.strerror}") from None
    try:
        os.fchmod(handle, 0o600)
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            handle = -1
            out.write(document)
    finally:
        if handle != -1:
            os.close(handle)


def render(data: ReportData, generated: datetime,
           context: Callable[[str], Sequence[ContextMark]] | None = None) -> str:
    """The whole document. `context(patient_id)` gives that patient's context marks (none by default)."""
    marks_for = context or (lambda patient_id: ())
    parts = [
        _head(),
        f'<div class="phi" id="phi-banner" role="alert"><strong>Patient data.</strong> {_e(BANNER)}</div>',
        _title(data, generated),
        _summary(data),
        _runs_section(data),
        _grades_section(data),
        _quarantine_section(data),
        _written_section(data),
        _alerts_section(data),
        _patients_section(data, marks_for),
        "</main></body></html>\n",
    ]
    return "\n".join(parts)


# -- document parts -------------------------------------------------------------------------------------
_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1a1a1a;margin:0;background:#fafafa}
main{max-width:1000px;margin:0 auto;padding:0 20px 40px}
.phi{background:#fff3cd;border-bottom:3px solid #b7791f;padding:10px 20px;font-size:15px}
.dry{background:#e3f2fd;border:2px solid #1565c0;padding:8px 12px;margin:12px 0;border-radius:4px}
h1{font-size:24px;margin:18px 0 4px} h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #ccc}
h3{font-size:16px;margin:0 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;background:#fff}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f0f0} td.n{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:13px;background:#eef;padding:0 3px;border-radius:3px}
.patient{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px 14px;margin:14px 0}
.meta{color:#555} .key{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}
.key div{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px 12px}
.key b{display:block;font-size:20px}
.legend span{display:inline-block;margin-right:12px;font-size:12px}
.sw{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px;vertical-align:middle}
svg{display:block;max-width:100%;height:auto;background:#fff}
svg text{font:11px system-ui,sans-serif}
nav a{margin-right:10px}
"""


def _head() -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">\n'
        '<meta name="referrer" content="no-referrer">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        # An empty data: icon, so the browser does not ask for /favicon.ico.
        '<link rel="icon" href="data:,">\n'
        "<title>ANC adapter review report (patient data)</title>\n"
        f"<style>{_STYLE}</style></head><body>"
    )


def _title(data: ReportData, generated: datetime) -> str:
    window = _window_text(data.since, data.until) or "everything in the state"
    lines = [
        "<main><h1>ANC adapter review report</h1>",
        f'<p class="meta">Generated {_e(when_utc(generated))} from <code>{_e(data.source)}</code>. '
        f"Report window (count effective time, run start): {_e(window)}.</p>",
    ]
    if data.review:
        review_window = _window_text(parse_instant(data.review["since"]), parse_instant(data.review["until"]))
        lines.append(
            f'<div class="dry" id="dry-run"><strong>Dry run: nothing here was sent to the FHIR server.</strong> '
            f"This is the review copy left by <code>run --dry-run</code> (run {_e(data.review['run_id'])}, "
            f"started {_e(data.review['started'])}; read window: {_e(review_window or 'from the watermark')}). "
            "Where this report says written, read: <em>would be written</em> if the adapter ran for real. "
            "The live state and the server are unchanged.</div>")
    lines.append('<nav><a href="#runs">Runs</a><a href="#grades">Grades</a><a href="#quarantine">Quarantine</a>'
                 '<a href="#written">Written</a><a href="#alerts">Alerts per day</a>'
                 '<a href="#patients">Flagged patients</a></nav>')
    return "\n".join(lines)


def _summary(data: ReportData) -> str:
    abnormal = sum(n for grade, n in data.grades.items() if Grade(grade).abnormal)
    new_flags = sum(len(v) for v in data.new_episodes.values())
    items = [
        ("graded counts", data.counts_read), ("abnormal counts", abnormal),
        ("flagged patients", len(data.flagged)), ("episodes begun", new_flags),
        ("quarantined", len(data.quarantine)), ("runs", len(data.runs)),
    ]
    cells = "".join(f"<div><b>{n}</b>{_e(label)}</div>" for label, n in items)
    return f'<section id="summary" class="key">{cells}</section>'


def _runs_section(data: ReportData) -> str:
    out = ['<section id="runs"><h2>Runs over time</h2>']
    if not data.runs:
        out.append("<p>No runs in this window.</p></section>")
        return "\n".join(out)
    out.append(charts.runs_chart(data.runs))
    out.append('<div class="legend">' + _swatch("#90caf9", "observations read")
               + _swatch("#37474f", "resources written" + (" (by a dry run: would be)" if data.review else ""))
               + _swatch("#e65100", "quarantined") + _swatch("#b71c1c", "run failed (exit ≠ 0)") + "</div>")
    shown = [r for r in data.runs if r["exit_code"] not in (0, None)]
    latest = [r for r in reversed(data.runs) if r not in shown][:50]
    rows = sorted(shown + latest, key=lambda r: r["started"], reverse=True)
    out.append("<table><tr><th>started (UTC)</th><th>mode</th><th>exit</th><th>read</th><th>graded</th>"
               "<th>quarantined</th><th>created</th><th>updated</th><th>duration s</th></tr>")
    for run in rows:
        s = run["summary"] or {}
        graded = sum((s.get("classified") or {}).values()) if isinstance(s.get("classified"), dict) else ""
        out.append(
            f"<tr><td>{_e(run['started'])}</td><td>{_e(run['mode'])}</td><td class=n>{_e(run['exit_code'])}</td>"
            + "".join(f"<td class=n>{_e(v)}</td>" for v in (
                s.get("observations_read", ""), graded, s.get("quarantined", ""), s.get("created", ""),
                s.get("updated", ""), s.get("duration_s", "")))
            + "</tr>")
    out.append("</table>")
    if len(data.runs) > len(rows):
        out.append(f"<p class=meta>The latest 50 runs and every failed run are listed; "
                   f"{len(data.runs) - len(rows)} more are in the chart.</p>")
    out.append("</section>")
    return "\n".join(out)


def _grades_section(data: ReportData) -> str:
    items = [(f"{grade.value} — {grade.label}", data.grades[grade.value], GRADE_COLOUR[grade])
             for grade in Grade if data.grades.get(grade.value)]
    body = charts.hbars(items, "graded counts by grade") if items else "<p>No graded counts in this window.</p>"
    return ('<section id="grades"><h2>Grades</h2><p class=meta>Every graded count in the window, by grade.</p>'
            f"{body}</section>")


def _quarantine_section(data: ReportData) -> str:
    out = ['<section id="quarantine"><h2>Quarantine</h2>',
           "<p class=meta>Observations that could not be graded safely, by reason; never guessed. "
           "<code>anc-adapter quarantine list|retry|discard</code> works them.</p>"]
    if not data.quarantine:
        out.append("<p>Nothing quarantined in this window.</p></section>")
        return "\n".join(out)
    reasons = Counter(entry.reason for entry, _ in data.quarantine)
    out.append(charts.hbars([(reason, n, "#e65100") for reason, n in reasons.most_common()], "quarantine reasons"))
    out.append("<table><tr><th>Observation</th><th>patient</th><th>reason</th><th>detail</th>"
               "<th>effective</th><th>first seen</th></tr>")
    for entry, effective in data.quarantine[:500]:
        out.append(f"<tr><td><code>{_e(entry.observation_id)}</code></td><td><code>{_e(entry.patient_id)}</code>"
                   f"</td><td>{_e(entry.reason)}</td><td>{_e(entry.detail)}</td><td>{_e(effective)}</td>"
                   f"<td>{_e(entry.first_seen)}</td></tr>")
    out.append("</table>")
    if len(data.quarantine) > 500:
        out.append(f"<p class=meta>{len(data.quarantine) - 500} more: <code>anc-adapter quarantine list</code>.</p>")
    out.append("</section>")
    return "\n".join(out)


def _written_section(data: ReportData) -> str:
    out = ['<section id="written"><h2>What was written</h2>']
    if data.review:
        run_id = data.review["run_id"]
        plans = [p for p in data.planned if p["run_id"] == run_id]
        out.append(f"<p>The dry run would have sent <b>{len(plans)}</b> resources (nothing was sent):</p>")
        by_action = Counter((p["resource_type"], p["action"]) for p in plans)
        out.append(_count_table(by_action, ("resource", "would"), ("create", "update", "withdraw")))
        flag_plans = [p for p in plans if p["resource_type"] == "Flag"]
        if flag_plans:
            out.append("<h3>Flags the dry run would write</h3><table><tr><th>patient</th><th>would</th>"
                       "<th>status</th><th>text</th></tr>")
            for p in flag_plans:
                out.append(f"<tr><td><code>{_e(p['patient_id'])}</code></td><td>{_e(p['action'])}</td>"
                           f"<td>{_e(p['status'])}</td><td>{_e(_text(p['resource']))}</td></tr>")
            out.append("</table>")
    created = sum(int((r["summary"] or {}).get("created") or 0) for r in data.runs if r["mode"] != "dry-run")
    updated = sum(int((r["summary"] or {}).get("updated") or 0) for r in data.runs if r["mode"] != "dry-run")
    withdrawn = sum(1 for item, _ in data.written if item.status == "entered-in-error")
    out.append(f"<p>{'Before the dry run, the' if data.review else 'The'} adapter's own runs in this window "
               f"created <b>{created}</b> and updated <b>{updated}</b> resources on the server; "
               f"<b>{withdrawn}</b> of ours stand withdrawn (entered-in-error).</p>")
    status_counts = Counter((item.resource_type, item.status) for item, _ in data.written)
    statuses = tuple(sorted({status for _, status in status_counts}))
    if status_counts:
        out.append("<p class=meta>Every resource recorded in the state, by its current status"
                   + (" (including what the dry run would write)" if data.review else "") + ":</p>")
        out.append(_count_table(status_counts, ("resource", "status"), statuses))
    out.append("</section>")
    return "\n".join(out)


def _alerts_section(data: ReportData) -> str:
    out = ['<section id="alerts"><h2>Expected alerts per day</h2>',
           "<p class=meta>Episodes that began on each day (UTC, by the effective time of the first abnormal "
           "count): each one is a new Flag. Who and why: the table of flagged patients below.</p>"]
    if not data.new_episodes:
        out.append("<p>No episode began in this window.</p></section>")
        return "\n".join(out)
    first, last = _alert_days(data)
    days = (last - first).days + 1
    total = sum(len(v) for v in data.new_episodes.values())
    busiest = max(data.new_episodes.items(), key=lambda item: (len(item[1]), item[0]))
    out.append(f"<p><b>{total}</b> new Flags over <b>{days}</b> days ({_e(first)} to {_e(last)}): "
               f"<b>{total / days:.2f}</b> per day on average; the most on {_e(busiest[0])} "
               f"(<b>{len(busiest[1])}</b>).</p>")
    out.append(charts.day_bars(data.new_episodes, first, last))
    out.append("</section>")
    return "\n".join(out)


def _patients_section(data: ReportData, marks_for: Callable[[str], Sequence[ContextMark]]) -> str:
    out = ['<section id="patients"><h2>Flagged patients</h2>',
           "<p class=meta>Patients with an abnormal count in the window (and any whose Flag "
           + ("the dry run would withdraw" if data.review else "was withdrawn in it")
           + "), most severe first. Patients are shown by their FHIR id only.</p>"]
    if not data.flagged:
        out.append("<p>No flagged patients in this window.</p></section>")
        return "\n".join(out)
    out.append("<table id=patient-index><tr><th>patient</th><th>worst grade</th><th>episodes</th>"
               "<th>latest count</th><th>Flag</th><th>why</th></tr>")
    for number, patient in enumerate(data.flagged, start=1):
        latest = patient.readings[-1] if patient.readings else None
        latest_text = f"{latest[0].count} on {_day(latest[0].effective)} ({latest[1].grade.value})" if latest else "—"
        out.append(
            f'<tr><td><a href="#patient-{number}"><code>{_e(patient.patient_id)}</code></a></td>'
            f"<td>{_grade_badge(patient.worst)}</td><td class=n>{len(patient.episodes)}</td>"
            f"<td>{_e(latest_text)}</td><td>{_e(_flags_text(patient.flags))}</td><td>{_e(_why(patient))}</td></tr>")
    out.append("</table>")
    for number, patient in enumerate(data.flagged, start=1):
        out.append(_patient(number, patient, data, list(marks_for(patient.patient_id))))
    out.append("</section>")
    return "\n".join(out)


def _patient(number: int, patient: PatientView, data: ReportData, marks: list[ContextMark]) -> str:
    thresholds, marked = data.thresholds, ""
    if patient.duffy_null_floor is not None:
        # The lines the counts were graded by: for the adult table, mild now ends at the site's floor.
        thresholds = duffy_null_thresholds(data.thresholds, AgeBand.ADULT, patient.duffy_null_floor) or thresholds
        marked = (f"<p class=meta>Site-marked Duffy-null threshold: counts from {patient.duffy_null_floor:g} "
                  "cells/µL up are normal for this patient (adults and children from 1 year, clinical "
                  "profile); the lines show the thresholds used.</p>")
    febrile = ""
    if patient.febrile_episodes:
        febrile = ", febrile neutropenia in episode " + ", ".join(str(o) for o in sorted(patient.febrile_episodes))
    out = [f'<section class="patient" id="patient-{number}" data-patient="{_e(patient.patient_id)}">',
           f"<h3>Patient <code class=patient-id>{_e(patient.patient_id)}</code> — worst grade "
           f"{_grade_badge(patient.worst)}, {len(patient.episodes)} episode(s){_e(febrile)}</h3>",
           marked,
           charts.timeline(patient.patient_id, patient.shown, _spans(patient), thresholds, marks,
                           data.default_lln, data.since, data.until),
           '<div class="legend">' + "".join(_swatch(GRADE_COLOUR[g], g.value) for g in _grades_of(patient))
           + _swatch("#9e9e9e", "episode (shaded)") + "<span>○ a comparator result: at least this grade</span>"
           + "<span>◆ derived ANC</span>"
           + "".join(_swatch(MARK_COLOUR.get(k, OTHER_COLOUR), k) for k in sorted({m.kind for m in marks}))
           + "</div>"]
    if patient.flags:
        out.append("<table><tr><th>Flag identifier</th><th>status</th>"
                   + ("<th>dry run would</th><th>text</th>" if data.review else "") + "</tr>")
        for flag in patient.flags:
            extra = f"<td>{_e(flag.action or 'leave as is')}</td><td>{_e(flag.text)}</td>" if data.review else ""
            out.append(f"<tr><td><code>{_e(flag.identifier)}</code></td><td>{_e(flag.status)}</td>{extra}</tr>")
        out.append("</table>")
    out.append(f"<details><summary>{len(patient.shown)} count(s) in the window</summary><table><tr>"
               "<th>effective (UTC)</th><th>ANC cells/µL</th><th>grade</th><th>age band</th><th>Observation</th>"
               "<th>notes</th></tr>")
    for reading, result in patient.shown:
        out.append(f"<tr><td>{_e(when_utc(reading.effective))}</td><td class=n>{_e(reading.count)}</td>"
                   f"<td>{_e(('at least ' if result.at_least else '') + result.grade.value)}</td>"
                   f"<td>{_e(result.age_band.value)}</td><td><code>{_e(reading.observation_id)}</code></td>"
                   f"<td>{_e('; '.join(result.notes))}</td></tr>")
    out.append("</table></details></section>")
    return "\n".join(out)


# -- small helpers --------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _swatch(colour: str, label: str) -> str:
    return f'<span><i class="sw" style="background:{colour}"></i>{_e(label)}</span>'


def _grade_badge(grade: Grade) -> str:
    return f'<span style="color:{GRADE_COLOUR[grade]};font-weight:600">{_e(grade.value)}</span>'


def _grades_of(patient: PatientView) -> list[Grade]:
    present = {r.grade for _, r in patient.shown}
    return [g for g in Grade if g in present]


def _spans(patient: PatientView) -> list[charts.Span]:
    """Each episode as a shaded span, in the colour of its worst count, labelled with its Flag."""
    spans = []
    for episode in patient.episodes:
        worst = max((r.grade for _, r in _members(patient, episode)), key=lambda g: g.severity)
        flag = patient.flag_for(episode)
        label = f"episode {episode.ordinal}" + (", open" if episode.end is None else "")
        if episode.ordinal in patient.febrile_episodes:
            label += ", febrile"
        if flag:
            label += f": Flag {flag.status}" + (f" (dry run would {flag.action})" if flag.action else "")
        spans.append(charts.Span(episode.start, episode.end, worst, label))
    return spans


def _members(patient: PatientView, episode: Episode) -> list[Graded]:
    return [g for g in patient.readings if g[0].observation_id in episode.evidence] or [episode.latest]


def _flags_text(flags: Sequence[FlagView]) -> str:
    if not flags:
        return "—"
    return "; ".join(f.status + (f" (dry run would {f.action})" if f.action else "") for f in flags)


def _why(patient: PatientView) -> str:
    abnormal = [(r, c) for r, c in patient.shown if c.grade.abnormal]
    if not abnormal:
        return "Flag withdrawn: its counts were withdrawn or corrected"
    reading, result = min(abnormal, key=lambda g: (g[0].count.anc_per_ul, g[0].effective))
    notes = sorted({note for _, c in abnormal for note in c.notes})
    return (f"lowest {reading.count} cells/µL on {_day(reading.effective)}: {result.grade.label}"
            + (f" ({'; '.join(notes)})" if notes else ""))


def _count_table(counts: Counter[tuple[str, str]], headers: tuple[str, str], columns: Iterable[str]) -> str:
    columns = list(columns)
    kinds = sorted({kind for kind, _ in counts})
    rows = [f"<table><tr><th>{_e(headers[0])}</th>" + "".join(f"<th>{_e(headers[1])} {_e(c)}</th>" for c in columns)
            + "</tr>"]
    for kind in kinds:
        rows.append(f"<tr><td>{_e(kind)}</td>" + "".join(f"<td class=n>{counts.get((kind, c), 0)}</td>"
                                                         for c in columns) + "</tr>")
    rows.append("</table>")
    return "".join(rows)


def _alert_days(data: ReportData) -> tuple[date, date]:
    """The days the average is over: the report window, else the dry run's read window, else the data."""
    days = sorted(data.new_episodes)
    since = data.since or (parse_instant(data.review["since"]) if data.review else None)
    until = data.until or (parse_instant(data.review["until"] or data.review["started"]) if data.review else None)
    first = since.astimezone(timezone.utc).date() if since else days[0]
    last = (until - timedelta(microseconds=1)).astimezone(timezone.utc).date() if until else days[-1]
    return min(first, days[0]), max(last, days[-1])


def _text(resource: Any) -> str:
    code = resource.get("code") if isinstance(resource, dict) else None
    return str(code.get("text") or "") if isinstance(code, dict) else ""


def _window_text(since: datetime | None, until: datetime | None) -> str:
    if since is None and until is None:
        return ""
    return f"{when_utc(since) if since else 'the beginning'} to {when_utc(until) if until else 'now'}"




def _day(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d")


__all__ = ["BANNER", "CSP", "ContextMark", "FlagView", "PatientView", "ReportData", "collect", "context_marks",
           "render", "write"]
