"""`anc-adapter report --html FILE`: one self-contained HTML review of what the adapter graded and wrote
(CONTRACT §9), read from the state alone.

Charts are SVG drawn here, not by a charting library: the report must open with no network and no
script (its Content-Security-Policy allows neither), a library would be JavaScript to inline and keep
up to date, and the few chart shapes we need (bars, a timeline with threshold lines and shaded spans)
are a few dozen lines each. Every value from the state is untrusted text and is escaped.

`collect` reads the state (I/O); `render` is pure (the time of generation is passed in); `write` creates
the file `0600`. Clinical context (fever, chemotherapy, …) reaches a patient's timeline through one seam:
`render(..., context=...)`, a function from a patient id to `ContextMark`s, drawn as vertical markers."""

from __future__ import annotations

import html
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from adapter.episodes import Episode, Graded, episodes
from adapter.errors import ConfigError
from adapter.mappings import Thresholds
from adapter.model import AgeBand, Classification, Grade
from adapter.state import QuarantineEntry, State, Written

BANNER = ("This file contains patient data: FHIR patient ids with their neutrophil counts and dates. "
          "Keep it like the patient record: store it only where patient records may be kept, do not "
          "e-mail it, and delete it when the review is done.")
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

GRADE_COLOUR = {
    Grade.NORMAL: "#2e7d32", Grade.CTCAE_0: "#2e7d32",
    Grade.MILD: "#c79100", Grade.CTCAE_1: "#c79100", Grade.CTCAE_2: "#e08a00",
    Grade.MODERATE: "#e65100", Grade.CTCAE_3: "#e65100",
    Grade.SEVERE: "#b71c1c", Grade.CTCAE_4: "#b71c1c",
}
# Context kinds the clinical branch will send; any other kind is drawn grey with its label.
MARK_COLOUR = {"fever": "#d81b60", "chemotherapy": "#5e35b1", "projection": "#00838f"}
_OTHER_MARK = "#616161"


@dataclass(frozen=True)
class ContextMark:
    """Something on a patient's timeline that is not a count: a fever, a chemotherapy dose, a projection.
    `at` and `until` are timezone-aware; `until` draws a span instead of a line. `kind` picks the colour
    (MARK_COLOUR); `label` is shown as text (escaped)."""

    at: datetime
    label: str
    kind: str
    until: datetime | None = None


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
            until: datetime | None = None, default_lln: float = 2000.0) -> ReportData:
    """Read what the report shows from one state file, in one read transaction (a consistent snapshot
    while a cron run may be writing)."""
    state.db.execute("BEGIN")
    try:
        readings = state.all_readings()
        written = state.all_written()
        planned = state.planned()
        runs = state.runs()
        quarantine = state.quarantined()
        effective_of = state.quarantined_effective()
        review = state.review()
    finally:
        state.db.execute("COMMIT")

    def within(moment: datetime | None) -> bool:
        if since is None and until is None:
            return True
        return moment is not None and (since is None or moment >= since) and (until is None or moment < until)

    by_patient: dict[str, list[Graded]] = defaultdict(list)
    for graded in readings:
        by_patient[graded[0].patient_id].append(graded)
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
               and within(_instant(updated_at))}
    flagged = []
    new_episodes: dict[date, list[str]] = defaultdict(list)
    for patient_id in sorted(wanted):
        rows = sorted(by_patient.get(patient_id, []), key=lambda g: (g[0].effective, g[0].observation_id))
        found = episodes(rows)
        for episode in found:
            if within(episode.start):
                new_episodes[episode.start.astimezone(timezone.utc).date()].append(patient_id)
        flagged.append(PatientView(patient_id, tuple(rows), tuple(found), tuple(flags.get(patient_id, [])),
                                   tuple(g for g in rows if within(g[0].effective))))
    flagged.sort(key=lambda p: (-p.worst.severity, p.patient_id))
    shown_quarantine = tuple(
        (entry, effective_of.get(entry.observation_id, ""))
        for entry in quarantine
        if within(_instant(effective_of.get(entry.observation_id, "")) or _instant(entry.first_seen))
    )
    in_window = [r for g, r in readings if within(g.effective)]
    return ReportData(
        source=source, review=review, since=since, until=until,
        runs=tuple(r for r in runs if within(_instant(r["started"]))),
        grades=Counter(r.grade.value for r in in_window),
        quarantine=shown_quarantine, written=tuple(written), planned=tuple(planned), flagged=tuple(flagged),
        thresholds=thresholds, default_lln=default_lln, counts_read=len(in_window),
        new_episodes=dict(new_episodes),
    )


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
        f'<p class="meta">Generated {_e(_when(generated))} from <code>{_e(data.source)}</code>. '
        f"Report window (count effective time, run start): {_e(window)}.</p>",
    ]
    if data.review:
        review_window = _window_text(_instant(data.review["since"]), _instant(data.review["until"]))
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
    out.append(_runs_chart(data.runs))
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
    body = _hbars(items, "graded counts by grade") if items else "<p>No graded counts in this window.</p>"
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
    out.append(_hbars([(reason, n, "#e65100") for reason, n in reasons.most_common()], "quarantine reasons"))
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
    out.append(_day_bars(data.new_episodes, first, last))
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
    out = [f'<section class="patient" id="patient-{number}" data-patient="{_e(patient.patient_id)}">',
           f"<h3>Patient <code class=patient-id>{_e(patient.patient_id)}</code> — worst grade "
           f"{_grade_badge(patient.worst)}, {len(patient.episodes)} episode(s)</h3>",
           timeline(patient, data.thresholds, marks, data.default_lln, data.since, data.until),
           '<div class="legend">' + "".join(_swatch(GRADE_COLOUR[g], g.value) for g in _grades_of(patient))
           + _swatch("#9e9e9e", "episode (shaded)") + "<span>○ a comparator result: at least this grade</span>"
           + "<span>◆ derived ANC</span>"
           + "".join(_swatch(MARK_COLOUR.get(k, _OTHER_MARK), k) for k in sorted({m.kind for m in marks}))
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
        out.append(f"<tr><td>{_e(_when(reading.effective))}</td><td class=n>{_e(reading.count)}</td>"
                   f"<td>{_e(('at least ' if result.at_least else '') + result.grade.value)}</td>"
                   f"<td>{_e(result.age_band.value)}</td><td><code>{_e(reading.observation_id)}</code></td>"
                   f"<td>{_e('; '.join(result.notes))}</td></tr>")
    out.append("</table></details></section>")
    return "\n".join(out)


# -- charts (SVG) ---------------------------------------------------------------------------------------
_W, _H = 760, 250
_LEFT, _RIGHT, _TOP, _BOTTOM = 60, 14, 22, 34
_LABELS = 96  # right of a timeline's plot: the threshold labels


def timeline(patient: PatientView, thresholds: Thresholds, marks: Sequence[ContextMark] = (),
             default_lln: float = 2000.0, since: datetime | None = None, until: datetime | None = None) -> str:
    """One patient's counts over time against the thresholds that graded them (the age band and
    profile of each reading), episodes shaded with their Flag, and context marks as vertical lines."""
    shown = list(patient.shown)
    times = [r.effective for r, _ in shown] + [m.at for m in marks] + [m.until for m in marks if m.until]
    if not times:
        return (f'<svg class="timeline" role="img" viewBox="0 0 {_W} 60" width="{_W}" height="60">'
                f'<title>{_e(patient.patient_id)}: no graded count in the window</title>'
                f'<text x="{_LEFT}" y="34">No graded count in the window (the Flag rests on withdrawn or '
                "earlier counts).</text></svg>")
    start, end = min(times), max(times)
    if since is not None:
        start = max(min(start, since), start - timedelta(days=2))
    if until is not None:
        end = min(max(end, until), end + timedelta(days=2))
    if end - start < timedelta(days=1):
        middle = start + (end - start) / 2
        start, end = middle - timedelta(hours=12), middle + timedelta(hours=12)
    pad = (end - start) * 0.04
    start, end = start - pad, end + pad
    plot_w, plot_h = _W - _LEFT - _RIGHT - _LABELS, _H - _TOP - _BOTTOM
    bands = [_bounds(result, reading.lln_per_ul, thresholds, default_lln) for reading, result in shown]
    top_bound = max((bound for band in bands for _, bound in band), default=1500.0)
    highest = max((reading.count.anc_per_ul for reading, _ in shown), default=0.0)
    y_max = max(top_bound * 1.4, min(highest * 1.1, top_bound * 3))

    def x(moment: datetime) -> float:
        return _LEFT + plot_w * ((moment - start) / (end - start))

    def y(value: float) -> float:
        return _TOP + plot_h * (1 - min(value, y_max) / y_max)

    label = f"ANC timeline of patient {patient.patient_id}"
    svg = [f'<svg class="timeline" role="img" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" '
           f'aria-label="{_e(label)}"><title>{_e(label)}</title>',
           f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#bbb"/>']
    for episode in patient.episodes:  # shaded spans first, under everything else
        left, right = episode.start, episode.end or end
        if right < start or left > end:
            continue
        x0, x1 = x(max(left, start)), x(min(right, end))
        colour = GRADE_COLOUR[max((r.grade for _, r in _members(patient, episode)), key=lambda g: g.severity)]
        flag = patient.flag_for(episode)
        text = f"episode {episode.ordinal}" + (", open" if episode.end is None else "") + \
            (f": Flag {flag.status}" + (f" (dry run would {flag.action})" if flag.action else "") if flag else "")
        svg.append(f'<rect class="episode" x="{x0:.1f}" y="{_TOP}" width="{max(x1 - x0, 2):.1f}" '
                   f'height="{plot_h}" fill="{colour}" fill-opacity="0.12"><title>{_e(text)}</title></rect>')
        near_end = x0 > _LEFT + plot_w - 160  # a late episode: label it leftwards, on a second line
        svg.append(f'<text x="{(x1 - 3 if near_end else x0 + 3):.1f}" y="{_TOP + (26 if near_end else 12)}" '
                   f'text-anchor="{"end" if near_end else "start"}" fill="{colour}">{_e(text)}</text>')
    svg += _threshold_lines(shown, bands, x, y, start, end)
    svg += _y_axis(y, y_max, sorted({bound for band in bands for _, bound in band}))
    svg += _x_axis(x, start, end, _TOP + plot_h)
    for mark in marks:
        colour = MARK_COLOUR.get(mark.kind, _OTHER_MARK)
        if mark.until is not None and mark.until > mark.at:
            svg.append(f'<rect class="context" x="{x(mark.at):.1f}" y="{_TOP}" '
                       f'width="{max(x(mark.until) - x(mark.at), 1):.1f}" height="{plot_h}" fill="{colour}" '
                       f'fill-opacity="0.10"/>')
        svg.append(f'<line class="context" x1="{x(mark.at):.1f}" x2="{x(mark.at):.1f}" y1="{_TOP}" '
                   f'y2="{_TOP + plot_h}" stroke="{colour}" stroke-width="1.5" stroke-dasharray="2 3">'
                   f"<title>{_e(mark.kind)}: {_e(mark.label)} ({_e(_when(mark.at))})</title></line>")
        svg.append(f'<text x="{x(mark.at) + 3:.1f}" y="{_TOP + plot_h - 4}" fill="{colour}">{_e(mark.label)}</text>')
    points = " ".join(f"{x(r.effective):.1f},{y(r.count.anc_per_ul):.1f}" for r, _ in shown)
    svg.append(f'<polyline points="{points}" fill="none" stroke="#546e7a" stroke-width="1.2"/>')
    for reading, result in shown:
        cx, cy, colour = x(reading.effective), y(reading.count.anc_per_ul), GRADE_COLOUR[result.grade]
        tip = (f"{_when(reading.effective)}: ANC {reading.count} cells/µL, "
               f"{'at least ' if result.at_least else ''}{result.grade.value} ({result.age_band.value})"
               f"{', derived' if reading.sources else ''} — Observation {reading.observation_id}")
        fill = "#fff" if result.at_least else colour
        if reading.sources:
            shape = (f'<path class="count" d="M{cx:.1f} {cy - 6:.1f} L{cx + 6:.1f} {cy:.1f} L{cx:.1f} '
                     f'{cy + 6:.1f} L{cx - 6:.1f} {cy:.1f} Z" fill="{fill}" stroke="{colour}" stroke-width="2">')
            svg.append(f"{shape}<title>{_e(tip)}</title></path>")
        else:
            svg.append(f'<circle class="count" cx="{cx:.1f}" cy="{cy:.1f}" r="4.5" fill="{fill}" '
                       f'stroke="{colour}" stroke-width="2"><title>{_e(tip)}</title></circle>')
        if reading.count.anc_per_ul > y_max:
            svg.append(f'<text x="{cx + 6:.1f}" y="{cy + 10:.1f}">▲ {_e(reading.count)}</text>')
    svg.append("</svg>")
    return "\n".join(svg)


def _bounds(result: Classification, lln_per_ul: float | None, thresholds: Thresholds,
            default_lln: float) -> tuple[tuple[str, float], ...]:
    """The grade bounds that graded this reading: its profile (CTCAE grades say CTCAE) and age band."""
    if result.grade.value.startswith("ctcae"):
        lln = lln_per_ul if lln_per_ul is not None else default_lln
        bounds = thresholds.ctcae.bounds
        return bounds + (("ctcae-1", lln),) if bounds and lln > bounds[-1][1] else bounds
    if result.age_band is AgeBand.INFANT:
        return thresholds.infant.bounds
    if result.age_band is AgeBand.NEONATE:
        return thresholds.neonate.bounds
    return thresholds.adult.bounds


def _threshold_lines(shown: list[Graded], bands: list[tuple[tuple[str, float], ...]],
                     x: Callable[[datetime], float], y: Callable[[float], float],
                     start: datetime, end: datetime) -> list[str]:
    """Each stretch of readings graded by the same bounds draws its lines from its first reading to
    the next stretch (a first birthday or a profile change moves the lines there)."""
    stretches: list[tuple[datetime, tuple[tuple[str, float], ...]]] = []
    for (reading, _), band in zip(shown, bands):
        if not stretches or stretches[-1][1] != band:
            stretches.append((reading.effective, band))
    out = []
    for index, (begin, band) in enumerate(stretches):
        last = index + 1 == len(stretches)
        left = start if index == 0 else begin
        right = end if last else stretches[index + 1][0]
        for name, bound in band:
            colour = GRADE_COLOUR[Grade(name)] if name in Grade._value2member_map_ else _OTHER_MARK
            out.append(f'<line class="threshold" x1="{x(left):.1f}" x2="{x(right):.1f}" y1="{y(bound):.1f}" '
                       f'y2="{y(bound):.1f}" stroke="{colour}" stroke-dasharray="6 4">'
                       f"<title>{_e(name)} below {bound:g} cells/µL</title></line>")
            # The current bounds are labelled beside the plot; earlier ones where their stretch begins.
            where = f'x="{x(right) + 4:.1f}" y="{y(bound) + 4:.1f}"' if last else \
                f'x="{x(left) + 4:.1f}" y="{y(bound) - 3:.1f}"'
            out.append(f'<text {where} fill="{colour}">&lt; {bound:g} {_e(name)}</text>')
    return out


def _y_axis(y: Callable[[float], float], y_max: float, bounds: list[float]) -> list[str]:
    out = [f'<text x="{_LEFT - 6}" y="{_TOP - 8}" text-anchor="end">cells/µL</text>']
    for value in sorted({0.0, *bounds, round(y_max, -2)}):
        if value > y_max:
            continue
        out.append(f'<text x="{_LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:g}</text>')
    return out


def _x_axis(x: Callable[[datetime], float], start: datetime, end: datetime, baseline: float) -> list[str]:
    out = []
    fine = end - start < timedelta(days=4)
    for step in range(6):
        moment = start + (end - start) * (step + 0.5) / 6
        text = moment.astimezone(timezone.utc).strftime("%m-%d %H:%M" if fine else "%Y-%m-%d")
        out.append(f'<line x1="{x(moment):.1f}" x2="{x(moment):.1f}" y1="{baseline}" y2="{baseline + 4}" '
                   'stroke="#999"/>')
        out.append(f'<text x="{x(moment):.1f}" y="{baseline + 16}" text-anchor="middle">{text}</text>')
    return out


def _hbars(items: list[tuple[str, int, str]], title: str) -> str:
    width, label_w, row = 760, 300, 22
    height = row * len(items) + 10
    top = max(n for _, n, _ in items) or 1
    out = [f'<svg class="bars" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           f'aria-label="{_e(title)}"><title>{_e(title)}</title>']
    for index, (label, n, colour) in enumerate(items):
        bar = (width - label_w - 60) * n / top
        y0 = 5 + index * row
        out.append(f'<text x="{label_w - 6}" y="{y0 + 14}" text-anchor="end">{_e(label)}</text>')
        out.append(f'<rect x="{label_w}" y="{y0 + 2}" width="{max(bar, 1):.1f}" height="{row - 6}" fill="{colour}">'
                   f"<title>{_e(label)}: {n}</title></rect>")
        out.append(f'<text x="{label_w + bar + 5:.1f}" y="{y0 + 14}">{n}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _day_bars(per_day: dict[date, list[str]], first: date, last: date) -> str:
    days = (last - first).days + 1
    plot_w, plot_h = _W - _LEFT - _RIGHT, 140
    top = max(len(v) for v in per_day.values())
    slot = plot_w / days
    out = [f'<svg class="bars" role="img" viewBox="0 0 {_W} {plot_h + 50}" width="{_W}" height="{plot_h + 50}" '
           'aria-label="new Flags per day"><title>new Flags per day</title>',
           f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{_TOP + plot_h}" y2="{_TOP + plot_h}" stroke="#999"/>',
           f'<text x="{_LEFT - 6}" y="{_TOP + 4}" text-anchor="end">{top}</text>',
           f'<text x="{_LEFT - 6}" y="{_TOP + plot_h + 4}" text-anchor="end">0</text>']
    for day, patients in sorted(per_day.items()):
        if not first <= day <= last:
            continue
        height = plot_h * len(patients) / top
        x0 = _LEFT + slot * (day - first).days
        out.append(f'<rect x="{x0 + slot * 0.1:.1f}" y="{_TOP + plot_h - height:.1f}" width="{max(slot * 0.8, 1):.1f}" '
                   f'height="{height:.1f}" fill="#b71c1c"><title>{_e(day)}: {len(patients)} new Flag(s)</title></rect>')
    for step in range(min(days, 6)):
        day = first + timedelta(days=round(step * (days - 1) / max(min(days, 6) - 1, 1)))
        anchor = "end" if step and step == min(days, 6) - 1 else "start" if step == 0 else "middle"
        at = _LEFT + slot * ((day - first).days + {"start": 0, "middle": 0.5, "end": 1}[anchor])
        out.append(f'<text x="{at:.1f}" y="{_TOP + plot_h + 16}" text-anchor="{anchor}">{_e(day)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _runs_chart(runs: Sequence[dict[str, Any]]) -> str:
    """Per run, or per day when the runs span more than two days (cron every few minutes)."""
    buckets: dict[str, list[dict[str, Any]]] = defaultdict(list)
    starts = [_instant(r["started"]) for r in runs]
    known = [s for s in starts if s is not None]
    daily = bool(known) and max(known) - min(known) > timedelta(days=2)
    for run, started in zip(runs, starts):
        key = started.astimezone(timezone.utc).date().isoformat() if daily and started \
            else f"{run['started'][:19]} {run['run_id']}"
        buckets[key].append(run)
    keys = sorted(buckets)
    one_day = len({key[:10] for key in keys}) == 1
    labels = [key if daily else key[11:16] if one_day else key[5:16].replace("T", " ") for key in keys]
    totals = []
    for key in keys:
        summaries = [r["summary"] or {} for r in buckets[key]]
        totals.append((key,
                       sum(int(s.get("observations_read") or 0) for s in summaries),
                       sum(int(s.get("created") or 0) + int(s.get("updated") or 0) for s in summaries),
                       sum(int(s.get("quarantined") or 0) for s in summaries),
                       sum(1 for r in buckets[key] if r["exit_code"] not in (0, None))))
    plot_w, plot_h = _W - _LEFT - _RIGHT, 150
    top = max((max(t[1], t[2], t[3]) for t in totals), default=0) or 1
    slot = min(plot_w / len(totals), 90)
    out = [f'<svg class="bars" role="img" viewBox="0 0 {_W} {plot_h + 54}" width="{_W}" height="{plot_h + 54}" '
           f'aria-label="runs over time"><title>runs over time ({"per day" if daily else "per run"})</title>',
           f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{_TOP + plot_h}" y2="{_TOP + plot_h}" stroke="#999"/>',
           f'<text x="{_LEFT - 6}" y="{_TOP + 4}" text-anchor="end">{top}</text>',
           f'<text x="{_LEFT - 6}" y="{_TOP + plot_h + 4}" text-anchor="end">0</text>']
    for index, (_, read, written, quarantined, failed) in enumerate(totals):
        x0 = _LEFT + slot * index
        for offset, value, colour, what in ((0.08, read, "#90caf9", "read"), (0.38, written, "#37474f", "written"),
                                            (0.68, quarantined, "#e65100", "quarantined")):
            height = plot_h * value / top
            out.append(f'<rect x="{x0 + slot * offset:.1f}" y="{_TOP + plot_h - height:.1f}" '
                       f'width="{max(slot * 0.26, 0.8):.1f}" height="{height:.1f}" fill="{colour}">'
                       f"<title>{_e(labels[index])}: {value} {what}</title></rect>")
        if failed:
            out.append(f'<path d="M{x0 + slot / 2:.1f} {_TOP + plot_h + 3} l5 9 h-10 Z" fill="#b71c1c">'
                       f"<title>{_e(labels[index])}: {failed} failed run(s)</title></path>")
    for step in range(min(len(keys), 6)):
        index = round(step * (len(keys) - 1) / max(min(len(keys), 6) - 1, 1))
        out.append(f'<text x="{_LEFT + slot * (index + 0.5):.1f}" y="{_TOP + plot_h + 26}" '
                   f'text-anchor="middle">{_e(labels[index])}</text>')
    if one_day and not daily:
        out.append(f'<text x="{_W - _RIGHT}" y="{_TOP - 6}" text-anchor="end">runs on {_e(keys[0][:10])} '
                   "(UTC)</text>")
    out.append("</svg>")
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
    since = data.since or (_instant(data.review["since"]) if data.review else None)
    until = data.until or (_instant(data.review["until"] or data.review["started"]) if data.review else None)
    first = since.astimezone(timezone.utc).date() if since else days[0]
    last = (until - timedelta(microseconds=1)).astimezone(timezone.utc).date() if until else days[-1]
    return min(first, days[0]), max(last, days[-1])


def _text(resource: Any) -> str:
    code = resource.get("code") if isinstance(resource, dict) else None
    return str(code.get("text") or "") if isinstance(code, dict) else ""


def _window_text(since: datetime | None, until: datetime | None) -> str:
    if since is None and until is None:
        return ""
    return f"{_when(since) if since else 'the beginning'} to {_when(until) if until else 'now'}"


def _instant(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _when(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _day(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d")


__all__ = ["BANNER", "CSP", "ContextMark", "FlagView", "PatientView", "ReportData", "collect", "render",
           "timeline", "write"]
