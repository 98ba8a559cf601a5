"""One patient's FHIR resources -> CDS Hooks 2.0 cards (CONTRACT §8). Pure: no HTTP, no files, no clock
("now" comes in). `serve` brings the resources (from prefetch or fetched) and sends the cards back.

The clinical reasoning has one home here, `_assess`: the same stages as `run` (extract, units, classify,
then the assessment core of adapter/clinical/assess.py: episodes, febrile neutropenia, projection,
chemotherapy, a site-marked Duffy-null threshold), with the same rules (`assess.Rules.from_config`), so a
card and the Flag `run` writes for the same data agree."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import cached_property
from typing import Any

from adapter import context_extract, extract
from adapter.clinical import assess as assess_module
from adapter.clinical import classify, context
from adapter.clinical.assess import AssessedCount, AssessedEpisode
from adapter.clinical.context import Fever
from adapter.config import ClassifyConfig, Config, ContextConfig
from adapter.mappings import Band, Coding, ContextMappings, Mappings
from adapter.model import AgeBand, Classification, Quarantine, Reading
from adapter.state import ContextFact

Graded = tuple[Reading, Classification]

SUMMARY_MAX = 139  # CDS Hooks 2.0: summary "<140 characters"
RECENT_SHOWN = 5  # counts listed in a card's detail

# The card's indicator is the Flag's priority (CONTRACT §6, §8): febrile or severe high, moderate medium.
_INDICATOR = {assess_module.PRIORITY_HIGH: "critical", assess_module.PRIORITY_MEDIUM: "warning",
              assess_module.PRIORITY_LOW: "info"}
_PROFILE_LABEL = {"clinical": "clinical profile", "ctcae-v5": "CTCAE v5 profile"}
_BAND_LABEL = {
    AgeBand.ADULT: "adult thresholds (1 year and older)",
    AgeBand.UNKNOWN: "adult thresholds (age unknown)",
    AgeBand.INFANT: "infant thresholds (2 weeks to under 1 year)",
    AgeBand.NEONATE: "neonate thresholds (under 2 weeks)",
}

ATC = context_extract.ATC
SNOMED = context_extract.SNOMED
RXNORM = context_extract.RXNORM


@dataclass(frozen=True)
class ChemotherapyCodes:
    """What makes an order chemotherapy (CONTRACT §5b): the lists of mappings/context.toml (ATC prefixes,
    RxNorm ingredients, SNOMED procedures), tested exactly as `run` tests the records it reads."""

    mappings: ContextMappings

    def matches(self, coding: Coding) -> bool:
        return context_extract.is_chemotherapy(coding[0], coding[1], self.mappings)


@dataclass(frozen=True)
class Rules:
    """Everything the cards depend on besides the patient's data, taken from the config once at start."""

    mappings: Mappings
    profile: str = "clinical"
    pediatric: bool = True
    default_lln: float = 2000.0
    statuses: tuple[str, ...] = ("final", "amended", "corrected")
    order_sign_recent: timedelta = timedelta(days=7)
    context: ContextConfig = field(default_factory=ContextConfig)  # [context] switches, as for `run`

    @classmethod
    def from_config(cls, config: Config, mappings: Mappings) -> Rules:
        return cls(mappings=mappings, profile=config.classify.profile, pediatric=config.classify.pediatric,
                   default_lln=config.classify.default_lln, statuses=config.poll.statuses,
                   order_sign_recent=config.serve.order_sign_window, context=config.context)

    @cached_property
    def core(self) -> assess_module.Rules:
        """The assessment core's rules, built by the same function `run` uses."""
        config = Config(classify=ClassifyConfig(profile=self.profile, pediatric=self.pediatric,
                                                default_lln=self.default_lln), context=self.context)
        return assess_module.Rules.from_config(config, self.mappings)

    @property
    def chemotherapy(self) -> ChemotherapyCodes:
        return ChemotherapyCodes(self.mappings.context)


@dataclass(frozen=True)
class PatientRecords:
    """The raw FHIR resources of one patient, as the EHR prefetched them or as we fetched them. Resources
    that name another patient are dropped by `_assess`, whoever sent them."""

    patient_id: str
    patient: Mapping[str, Any] | None = None
    observations: tuple[Mapping[str, Any], ...] = ()  # ANC and temperature Observations
    chemotherapy: tuple[Mapping[str, Any], ...] = ()  # MedicationAdministration, MedicationRequest, Procedure
    conditions: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class Assessment:
    counts: tuple[Graded, ...]  # this patient's graded counts (Duffy-null threshold applied), newest first
    ungraded: tuple[str, ...]  # quarantine reasons of counts that could not be graded (codes only)
    episode: AssessedEpisode | None  # the open episode when the latest count is abnormal
    latest_assessed: AssessedCount | None = None  # the latest count with its context
    unread: tuple[str, ...] = ()  # quarantine reasons of temperatures that could not be read (codes only)

    @property
    def latest(self) -> Graded | None:
        return self.counts[0] if self.counts else None

    @property
    def fever(self) -> Fever | None:
        """Febrile neutropenia in the open episode: it stays until the episode closes, as on the Flag."""
        return self.episode.fever if self.episode is not None else None

    @property
    def indicator(self) -> str:
        return _INDICATOR[self.episode.priority] if self.episode is not None else "info"


def patient_view(records: PatientRecords, rules: Rules, now: datetime) -> list[dict[str, Any]]:
    """A card when the latest count is abnormal; none when it is normal or there is none (a fever with a
    normal count is no card, as `run` writes no Flag for it). The indicator is the priority `run` gives
    the Flag: critical when febrile or severe."""
    assessment = _assess(records, rules, now)
    latest = assessment.latest
    if latest is None or assessment.episode is None or not latest[1].grade.abnormal:
        return []
    reading, result = latest
    summary = f"{_label(result)}: ANC {reading.count} cells/µL on {reading.effective.date().isoformat()}"
    if assessment.fever is not None:
        summary = f"Febrile neutropenia: {_fever_short(assessment.fever)} with {summary[0].lower()}{summary[1:]}"
    detail = _detail(f"**{_label(result)}**: ANC {reading.count} cells/µL on {_when(reading.effective)}.",
                     assessment, rules)
    return [_card(summary, assessment.indicator, detail, rules)]


def order_sign(records: PatientRecords, draft_orders: Mapping[str, Any], rules: Rules,
               now: datetime) -> list[dict[str, Any]]:
    """A warning when chemotherapy is being ordered and the latest count is abnormal, or no count is
    recent enough to know (CONTRACT §8). Other orders, or a recent normal count: no card."""
    orders = chemotherapy_orders(draft_orders, rules.chemotherapy)
    if not orders:
        return []
    assessment = _assess(records, rules, now)
    latest = assessment.latest
    names = ", ".join(sorted(set(orders)))
    window = _duration(rules.order_sign_recent)
    if latest is None or latest[0].effective < now - rules.order_sign_recent:
        summary = f"Chemotherapy order: no ANC in the last {window}"
        last = (f"The latest graded ANC is {latest[0].count} cells/µL on {_when(latest[0].effective)} "
                f"({_label(latest[1]).lower()})." if latest else "No graded ANC is on record for this patient.")
        detail = "\n\n".join(part for part in (
            f"**No absolute neutrophil count in the last {window}** before ordering: {names}.",
            last,
            _left_out_line(assessment.ungraded, _UNGRADED),
            f"Rule: a chemotherapy order needs an ANC from the last {window} (`[serve] order_sign_recent`).",
        ) if part)
        return [_card(summary, "warning", detail, rules)]
    reading, result = latest
    if assessment.episode is None or not result.grade.abnormal:
        return []
    summary = (f"Chemotherapy order: latest ANC {reading.count} cells/µL ({_label(result).lower()}) "
               f"on {reading.effective.date().isoformat()}")
    detail = _detail(f"**{_label(result)}** on the latest count before ordering: {names}.", assessment, rules)
    return [_card(summary, "warning", detail, rules)]


def _detail(headline: str, assessment: Assessment, rules: Rules) -> str:
    """A card's markdown detail about an abnormal latest count: the episode, the context, the recent
    counts, what could not be graded, and the rule used."""
    latest = assessment.latest
    return "\n\n".join(part for part in (
        headline,
        _episode_line(assessment.episode),
        *_context_lines(assessment),
        _counts_table(assessment.counts),
        _left_out_line(assessment.ungraded, _UNGRADED),
        _left_out_line(assessment.unread, "temperature(s) could not be read and are not used"),
        _notes_line(latest[1]),
        _rule_line(latest, rules, assessment),
    ) if part)


def chemotherapy_orders(draft_orders: Mapping[str, Any], codes: ChemotherapyCodes) -> list[str]:
    """Names of the chemotherapy orders in an order-sign `draftOrders` Bundle (MedicationRequest by its
    medication code or contained Medication; ServiceRequest by its code)."""
    names = []
    for entry in _list(draft_orders.get("entry")):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        for concept in _order_concepts(resource):
            codings = [c for c in _list(concept.get("coding")) if isinstance(c, dict)]
            if any(codes.matches((c.get("system"), c.get("code"))) for c in codings):
                names.append(_concept_name(concept))
                break
    return names


# --- the clinical core -------------------------------------------------------------------------------

def _assess(records: PatientRecords, rules: Rules, now: datetime) -> Assessment:
    """Grade the counts as `run` does, read the context as `run` does (context_extract), then hand both
    to the assessment core. `now` is not used by the grading: a card says what the data says."""
    patient = extract.patient(records.patient) if records.patient else None
    if patient is not None and patient.patient_id != records.patient_id:
        patient = None  # never grade one patient by another's birth date
    graded: dict[str, Graded] = {}
    ungraded: list[str] = []
    for resource in records.observations:
        extracted = extract.observation(resource, rules.mappings, rules.statuses)
        if extracted is None or extracted.seen.patient_id != records.patient_id:
            continue
        outcome = extracted.outcome
        if isinstance(outcome, Quarantine):
            ungraded.append(outcome.reason.value)
        elif isinstance(outcome, Reading) and outcome.observation_id not in graded:
            result = _classify(outcome, patient, rules)
            if isinstance(result, Quarantine):
                ungraded.append(result.reason.value)
            else:
                graded[outcome.observation_id] = (outcome, result)
    # Derived ANC ([classify] derive) is not computed here: a card shows measured counts only.
    facts, unread = _context_facts(records, rules)
    found = assess_module.assess(graded.values(), context_extract.context(facts), rules.core)
    last = found.episodes[-1] if found.episodes else None
    return Assessment(
        counts=tuple(c.graded for c in reversed(found.counts)), ungraded=tuple(ungraded),
        episode=last if last is not None and last.episode.closed_by is None else None,
        latest_assessed=found.counts[-1] if found.counts else None, unread=tuple(unread),
    )


def _context_facts(records: PatientRecords, rules: Rules) -> tuple[list[ContextFact], list[str]]:
    """This patient's temperatures, chemotherapy records and Duffy-null markers as `run` stores them,
    and the reasons of temperatures that could not be read safely (quarantined by `run`, left out here)."""
    medications = {r["id"]: r for r in records.chemotherapy
                   if r.get("resourceType") == "Medication" and isinstance(r.get("id"), str)}
    facts: dict[tuple[str, str], ContextFact] = {}
    unread: list[str] = []
    for resource in (*records.observations, *records.chemotherapy, *records.conditions):
        if resource.get("resourceType") == "Medication":
            continue
        fact = context_extract.fact(resource, rules.mappings.context, rules.statuses, medications)
        if isinstance(fact, Quarantine):
            if extract.patient_reference_id(resource.get("subject")) == records.patient_id:
                unread.append(fact.reason.value)
        elif fact is not None and fact.patient_id == records.patient_id and fact.kind != "none":
            facts.setdefault((fact.resource_type, fact.resource_id), fact)
    return list(facts.values()), unread


def _classify(reading: Reading, patient: Any, rules: Rules) -> Classification | Quarantine:
    band = classify.patient_age_band(patient, reading.effective.date(), rules.pediatric, rules.mappings.thresholds)
    lln = reading.lln_per_ul if reading.lln_per_ul is not None else rules.default_lln
    return classify.classify(reading.count, band, rules.profile, rules.mappings.thresholds, lln)


# --- rendering -----------------------------------------------------------------------------------------

def _card(summary: str, indicator: str, detail: str, rules: Rules) -> dict[str, Any]:
    if len(summary) > SUMMARY_MAX:
        summary = summary[: SUMMARY_MAX - 1] + "…"
    return {
        "uuid": str(uuid.uuid4()),
        "summary": summary,
        "indicator": indicator,
        "detail": detail,
        "source": {"label": f"anc-adapter ({_PROFILE_LABEL.get(rules.profile, rules.profile)})"},
    }


def _label(result: Classification) -> str:
    label = result.grade.label
    return f"At least {label[0].lower()}{label[1:]}" if result.at_least else label


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M") + (" UTC" if moment.utcoffset() == timedelta(0)
                                               else moment.strftime(" %z"))


def _episode_line(assessed: AssessedEpisode | None) -> str:
    episode = assessed.episode if assessed is not None else None
    if episode is None or episode.first is episode.latest:
        return ""
    return (f"Neutropenic since {_when(episode.start)}: {len(episode.evidence)} abnormal counts in this "
            f"episode.")


def _counts_table(counts: Iterable[Graded]) -> str:
    rows = [f"| {_when(r.effective)} | {r.count} | {_label(c).lower()} |" for r, c in list(counts)[:RECENT_SHOWN]]
    return "Recent counts, newest first:\n\n| Taken | ANC (cells/µL) | Grade |\n|---|---|---|\n" + "\n".join(rows)


_UNGRADED = "count(s) could not be graded and are not shown"


def _left_out_line(reasons: tuple[str, ...], what: str) -> str:
    """How many inputs were left out, and why (quarantine reasons, never the values)."""
    if not reasons:
        return ""
    return f"{len(reasons)} {what} ({', '.join(sorted(set(reasons)))})."


def _fever_short(fever: Fever) -> str:
    hottest = max(t.celsius for t in fever.readings)
    return f"{context.shown_celsius(hottest)} °C" + (" sustained" if fever.sustained else "")


def _fever_text(fever: Fever) -> str:
    """As the Flag's text says it (°C with one decimal, °F as recorded when that is how it came)."""
    if fever.sustained:
        first, last = fever.readings[0], fever.readings[-1]
        return (f"temperature ≥ {fever.threshold:.1f} °C from {_when(first.time)} to {_when(last.time)} "
                f"({len(fever.readings)} readings)")
    reading = fever.readings[0]
    recorded = f" ({reading.recorded} as recorded)" if reading.recorded else ""
    return f"temperature {context.shown_celsius(reading.celsius)} °C{recorded} at {_when(reading.time)}"


def _context_lines(assessment: Assessment) -> list[str]:
    """What the data around the counts shows (CONTRACT §5b), one markdown paragraph each; nothing is said
    about what is not there."""
    lines = []
    if assessment.fever is not None:
        lines.append(f"**Febrile neutropenia**: {_fever_text(assessment.fever)}.")
    latest = assessment.latest_assessed
    if latest is None:
        return lines
    if latest.projection is not None:
        lines.append(f"Projected to fall below 500 cells/µL by {_when(latest.projection.below_by)} "
                     "(the fall since the previous count continuing at the same rate per hour).")
    if latest.chemotherapy is not None:
        chemo = latest.chemotherapy
        days = context.days_before(chemo, latest.reading.effective)
        lines.append(f"After chemotherapy: {chemo.name} on {chemo.time.astimezone(timezone.utc).date().isoformat()} "
                     f"({days} days before this count).")
    if latest.duffy_null_floor is not None:
        lines.append(f"Site-marked Duffy-null threshold: normal from {latest.duffy_null_floor:g} cells/µL "
                     "(the site marks this patient; never inferred).")
    return lines


def _notes_line(result: Classification) -> str:
    return f"Note: {'; '.join(result.notes)}." if result.notes else ""


def _rule_line(graded: Graded, rules: Rules, assessment: Assessment) -> str:
    line = _grade_rule(graded, rules, assessment.latest_assessed)
    if assessment.fever is not None:
        febrile = rules.core.febrile_rules
        line += (f" Febrile neutropenia (IDSA): one temperature ≥ {febrile.single_celsius:g} °C, or "
                 f"≥ {febrile.sustained_celsius:g} °C over {febrile.sustained_minutes:g} minutes, within "
                 f"{febrile.window_hours:g} hours of a count below {febrile.anc_below:g} cells/µL or one "
                 f"projected to fall below it within {febrile.projection_hours:g} hours.")
    return line


def _grade_rule(graded: Graded, rules: Rules, latest: AssessedCount | None) -> str:
    reading, result = graded
    if rules.profile == "ctcae-v5":
        lln = reading.lln_per_ul if reading.lln_per_ul is not None else rules.default_lln
        bounds = ", ".join(f"grade {name[-1]} < {bound:g}" for name, bound in rules.mappings.thresholds.ctcae.bounds)
        lln_source = "the lab's reference range" if reading.lln_per_ul is not None else "`[classify] default_lln`"
        return (f"Rule: CTCAE v5 \"Neutrophil count decreased\": {bounds} cells/µL; grade 1 below the lower "
                f"limit of normal, {lln:g} cells/µL ({lln_source}).")
    thresholds, marked = rules.mappings.thresholds, ""
    if latest is not None and latest.duffy_null_floor is not None:
        lowered = context.duffy_null_thresholds(thresholds, result.age_band, latest.duffy_null_floor)
        if lowered is not None:
            thresholds, marked = lowered, ", with the site-marked Duffy-null threshold"
    table = _band_table(result.age_band, thresholds)
    bounds = ", ".join(f"{name} < {bound:g}" for name, bound in table.bounds)
    return f"Rule: clinical profile, {_BAND_LABEL[result.age_band]}{marked}: {bounds} cells/µL."


def _band_table(band: AgeBand, thresholds: Any) -> Band:
    return {AgeBand.NEONATE: thresholds.neonate, AgeBand.INFANT: thresholds.infant}.get(band, thresholds.adult)


def _duration(span: timedelta) -> str:
    if span % timedelta(days=1) == timedelta(0):
        days = span // timedelta(days=1)
        return "day" if days == 1 else f"{days} days"
    hours = span / timedelta(hours=1)
    return "hour" if hours == 1 else f"{hours:g} hours"


def _order_concepts(resource: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    kind = resource.get("resourceType")
    if kind == "MedicationRequest":
        concept = resource.get("medicationCodeableConcept")
        if isinstance(concept, dict):
            return [concept]
        reference = resource.get("medicationReference")
        target = reference.get("reference") if isinstance(reference, dict) else None
        if isinstance(target, str) and target.startswith("#"):
            for contained in _list(resource.get("contained")):
                if isinstance(contained, dict) and contained.get("resourceType") == "Medication" \
                        and contained.get("id") == target[1:] and isinstance(contained.get("code"), dict):
                    return [contained["code"]]
        return []
    if kind == "ServiceRequest" and isinstance(resource.get("code"), dict):
        return [resource["code"]]
    return []


def _concept_name(concept: Mapping[str, Any]) -> str:
    if isinstance(concept.get("text"), str) and concept["text"].strip():
        return concept["text"].strip()[:80]
    for coding in _list(concept.get("coding")):
        if isinstance(coding, dict) and isinstance(coding.get("display"), str):
            return coding["display"][:80]
    return "a chemotherapy order"


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
