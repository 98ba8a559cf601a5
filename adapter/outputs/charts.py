"""SVG charts for the review report, drawn here rather than by a charting library: the report must
open with no network and no script (its Content-Security-Policy allows neither); a library would be
JavaScript to inline and keep up to date, for a few shapes that take a few dozen lines each: bars, and
a timeline with threshold lines and shaded spans. Pure: numbers and text in, SVG text out; every text
is escaped."""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any

from adapter.clinical.episodes import Graded
from adapter.mappings import Thresholds
from adapter.model import AgeBand, Classification, Grade

GRADE_COLOUR = {
    Grade.NORMAL: "#2e7d32", Grade.CTCAE_0: "#2e7d32",
    Grade.MILD: "#c79100", Grade.CTCAE_1: "#c79100", Grade.CTCAE_2: "#e08a00",
    Grade.MODERATE: "#e65100", Grade.CTCAE_3: "#e65100",
    Grade.SEVERE: "#b71c1c", Grade.CTCAE_4: "#b71c1c",
}
# Context kinds (clinical context, CONTRACT §5b); any other kind is drawn grey, with its label.
MARK_COLOUR = {"fever": "#d81b60", "chemotherapy": "#5e35b1", "projection": "#00838f"}
OTHER_COLOUR = "#616161"


@dataclass(frozen=True)
class ContextMark:
    """Something on a patient's timeline that is not a count: a fever, a chemotherapy dose, a projection.
    `at` and `until` are timezone-aware; `until` draws a span instead of a line. `kind` picks the colour
    (MARK_COLOUR); `label` is shown as text (escaped)."""

    at: datetime
    label: str
    kind: str
    until: datetime | None = None



_W, _H = 760, 250
_LEFT, _RIGHT, _TOP, _BOTTOM = 60, 14, 22, 34
_LABELS = 96  # right of a timeline's plot: the threshold labels


@dataclass(frozen=True)
class Span:
    """A shaded stretch of a timeline: an episode (`end` None while it is open), coloured by `grade`."""

    start: datetime
    end: datetime | None
    grade: Grade
    label: str


def timeline(patient_id: str, counts: Sequence[Graded], spans: Sequence[Span], thresholds: Thresholds,
             marks: Sequence[ContextMark] = (), default_lln: float = 2000.0, since: datetime | None = None,
             until: datetime | None = None) -> str:
    """One patient's counts over time against the thresholds that graded them (the age band and
    profile of each reading), episodes shaded, and context marks as vertical lines or spans."""
    shown = list(counts)
    times = [r.effective for r, _ in shown] + [m.at for m in marks] + [m.until for m in marks if m.until]
    if not times:
        return (f'<svg class="timeline" role="img" viewBox="0 0 {_W} 60" width="{_W}" height="60">'
                f'<title>{_e(patient_id)}: no graded count in the window</title>'
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

    label = f"ANC timeline of patient {patient_id}"
    svg = [f'<svg class="timeline" role="img" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" '
           f'aria-label="{_e(label)}"><title>{_e(label)}</title>',
           f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#bbb"/>']
    for span in spans:  # shaded first, under everything else
        left, right = span.start, span.end or end
        if right < start or left > end:
            continue
        x0, x1 = x(max(left, start)), x(min(right, end))
        colour, text = GRADE_COLOUR[span.grade], span.label
        svg.append(f'<rect class="episode" x="{x0:.1f}" y="{_TOP}" width="{max(x1 - x0, 2):.1f}" '
                   f'height="{plot_h}" fill="{colour}" fill-opacity="0.12"><title>{_e(text)}</title></rect>')
        near_end = x0 > _LEFT + plot_w - 160  # a late episode: label it leftwards, on a second line
        svg.append(f'<text x="{(x1 - 3 if near_end else x0 + 3):.1f}" y="{_TOP + (26 if near_end else 12)}" '
                   f'text-anchor="{"end" if near_end else "start"}" fill="{colour}">{_e(text)}</text>')
    svg += _threshold_lines(shown, bands, x, y, start, end)
    svg += _y_axis(y, y_max, sorted({bound for band in bands for _, bound in band}))
    svg += _x_axis(x, start, end, _TOP + plot_h)
    label_rows: list[list[tuple[float, float]]] = []  # per row of mark labels, the stretches they take
    for mark in sorted(marks, key=lambda m: m.at):
        colour = MARK_COLOUR.get(mark.kind, OTHER_COLOUR)
        if mark.until is not None and mark.until > mark.at:
            svg.append(f'<rect class="context" x="{x(mark.at):.1f}" y="{_TOP}" '
                       f'width="{max(x(mark.until) - x(mark.at), 1):.1f}" height="{plot_h}" fill="{colour}" '
                       f'fill-opacity="0.10"/>')
        svg.append(f'<line class="context" x1="{x(mark.at):.1f}" x2="{x(mark.at):.1f}" y1="{_TOP}" '
                   f'y2="{_TOP + plot_h}" stroke="{colour}" stroke-width="1.5" stroke-dasharray="2 3">'
                   f"<title>{_e(mark.kind)}: {_e(mark.label)} ({_e(when_utc(mark.at))})</title></line>")
        # Marks close in time (a fever two hours after a count, a projection from the same count) would
        # print their labels over each other: each label takes the lowest row where it fits.
        # A label that would run off the right edge is written leftwards from its line instead.
        width = 6.2 * len(mark.label)
        rightwards = x(mark.at) + 3 + width <= _W - 2
        left = x(mark.at) + 3 if rightwards else x(mark.at) - 3 - width
        row = next((i for i, used in enumerate(label_rows)
                    if all(left + width + 6 < a or left > b + 6 for a, b in used)), len(label_rows))
        if row == len(label_rows):
            label_rows.append([])
        label_rows[row].append((left, left + width))
        anchor = "" if rightwards else ' text-anchor="end"'
        svg.append(f'<text x="{(left if rightwards else left + width):.1f}" y="{_TOP + plot_h - 4 - 13 * row}"'
                   f'{anchor} fill="{colour}">{_e(mark.label)}</text>')
    points = " ".join(f"{x(r.effective):.1f},{y(r.count.anc_per_ul):.1f}" for r, _ in shown)
    svg.append(f'<polyline points="{points}" fill="none" stroke="#546e7a" stroke-width="1.2"/>')
    for reading, result in shown:
        cx, cy, colour = x(reading.effective), y(reading.count.anc_per_ul), GRADE_COLOUR[result.grade]
        tip = (f"{when_utc(reading.effective)}: ANC {reading.count} cells/µL, "
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
            colour = GRADE_COLOUR[Grade(name)] if name in Grade._value2member_map_ else OTHER_COLOUR
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
    for value in sorted({0.0, *bounds, float(int(y_max // 100) * 100)}):
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


def hbars(items: list[tuple[str, int, str]], title: str) -> str:
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


def day_bars(per_day: dict[date, list[str]], first: date, last: date) -> str:
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


def runs_chart(runs: Sequence[dict[str, Any]]) -> str:
    """Per run, or per day when the runs span more than two days (cron every few minutes)."""
    buckets: dict[str, list[dict[str, Any]]] = defaultdict(list)
    starts = [parse_instant(r["started"]) for r in runs]
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


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def when_utc(moment: datetime) -> str:
    """An instant as the report shows it (UTC, to the minute)."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def parse_instant(text: str | None) -> datetime | None:
    """A stored ISO instant; None when absent or unreadable; a naive one is taken as UTC."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
