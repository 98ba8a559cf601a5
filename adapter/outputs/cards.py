"""One patient's FHIR resources -> CDS Hooks 2.0 cards (CONTRACT §8). Pure: no HTTP, no files, no clock
("now" comes in). `serve` brings the resources (from prefetch or fetched) and sends the cards back.

The clinical reasoning has one home here, `_assess`: today it runs the same stages as `run` (extract,
units, classify, episodes); the clinical-context core (febrile neutropenia, projection, chemotherapy,
Duffy-null) plugs in there and nowhere else (see MERGE below)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from adapter import extract
from adapter.clinical import classify, episodes
from adapter.config import Config
from adapter.mappings import Band, Coding, Mappings
from adapter.model import AgeBand, Classification, Grade, Quarantine, Reading

Graded = tuple[Reading, Classification]

SUMMARY_MAX = 139  # CDS Hooks 2.0: summary "<140 characters"
RECENT_SHOWN = 5  # counts listed in a card's detail

_INDICATOR = {
    Grade.SEVERE: "critical", Grade.CTCAE_4: "critical",
    Grade.MODERATE: "warning", Grade.CTCAE_3: "warning",
    Grade.MILD: "info", Grade.CTCAE_2: "info", Grade.CTCAE_1: "info",
}
_PROFILE_LABEL = {"clinical": "clinical profile", "ctcae-v5": "CTCAE v5 profile"}
_BAND_LABEL = {
    AgeBand.ADULT: "adult thresholds (1 year and older)",
    AgeBand.UNKNOWN: "adult thresholds (age unknown)",
    AgeBand.INFANT: "infant thresholds (2 weeks to under 1 year)",
    AgeBand.NEONATE: "neonate thresholds (under 2 weeks)",
}

ATC = "http://www.whocc.no/atc"
SNOMED = "http://snomed.info/sct"


@dataclass(frozen=True)
class ChemotherapyCodes:
    """What makes an order or a record chemotherapy (CONTRACT §5b).

    MERGE: the clinical-context branch ships these lists in mappings/context.toml (RxNorm ingredients,
    ATC prefixes, SNOMED procedures); build this from its loader then. Until then only the two codes
    DOMAIN-level sources name without further verification: ATC group L01 "Antineoplastic agents" and
    SNOMED CT 367336001 "Chemotherapy (procedure)". RxNorm codes are deliberately absent until verified."""

    codes: frozenset[Coding] = frozenset({(SNOMED, "367336001")})
    prefixes: tuple[Coding, ...] = ((ATC, "L01"),)

    def matches(self, coding: Coding) -> bool:
        system, code = coding
        return coding in self.codes or any(
            system == p_system and isinstance(code, str) and code.startswith(prefix)
            for p_system, prefix in self.prefixes)


@dataclass(frozen=True)
class Rules:
    """Everything the cards depend on besides the patient's data, taken from the config once at start."""

    mappings: Mappings
    profile: str = "clinical"
    pediatric: bool = True
    default_lln: float = 2000.0
    statuses: tuple[str, ...] = ("final", "amended", "corrected")
    order_sign_recent: timedelta = timedelta(days=7)
    chemotherapy: ChemotherapyCodes = field(default_factory=ChemotherapyCodes)

    @classmethod
    def from_config(cls, config: Config, mappings: Mappings) -> Rules:
        return cls(mappings=mappings, profile=config.classify.profile, pediatric=config.classify.pediatric,
                   default_lln=config.classify.default_lln, statuses=config.poll.statuses,
                   order_sign_recent=config.serve.order_sign_window)


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
    counts: tuple[Graded, ...]  # this patient's graded counts, newest first
    ungraded: tuple[str, ...]  # quarantine reasons of counts that could not be graded (codes only)
    episode: episodes.Episode | None  # the open episode when the latest count is abnormal
    # MERGE: what the context core finds (febrile neutropenia, projection, chemotherapy, Duffy-null).
    febrile: bool = False  # makes the card critical whatever the grade
    context: tuple[str, ...] = ()  # one markdown line each, shown under the counts

    @property
    def latest(self) -> Graded | None:
        return self.counts[0] if self.counts else None


def patient_view(records: PatientRecords, rules: Rules, now: datetime) -> list[dict[str, Any]]:
    """A card when the latest count is abnormal (or febrile); none when it is normal or there is none."""
    assessment = _assess(records, rules, now)
    latest = assessment.latest
    if latest is None or not (latest[1].grade.abnormal or assessment.febrile):
        return []
    reading, result = latest
    indicator = "critical" if assessment.febrile else _INDICATOR[result.grade]
    # MERGE: a febrile assessment's summary leads with "Febrile neutropenia".
    summary = f"{_label(result)}: ANC {reading.count} cells/µL on {reading.effective.date().isoformat()}"
    detail = "\n\n".join(part for part in (
        f"**{_label(result)}**: ANC {reading.count} cells/µL on {_when(reading.effective)}.",
        _episode_line(assessment.episode),
        *assessment.context,
        _counts_table(assessment.counts),
        _ungraded_line(assessment.ungraded),
        _notes_line(result),
        _rule_line(latest, rules),
    ) if part)
    return [_card(summary, indicator, detail, rules)]


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
            _ungraded_line(assessment.ungraded),
            f"Rule: a chemotherapy order needs an ANC from the last {window} (`[serve] order_sign_recent`).",
        ) if part)
        return [_card(summary, "warning", detail, rules)]
    reading, result = latest
    if not (result.grade.abnormal or assessment.febrile):
        return []
    summary = (f"Chemotherapy order: latest ANC {reading.count} cells/µL ({_label(result).lower()}) "
               f"on {reading.effective.date().isoformat()}")
    detail = "\n\n".join(part for part in (
        f"**{_label(result)}** on the latest count before ordering: {names}.",
        _episode_line(assessment.episode),
        *assessment.context,
        _counts_table(assessment.counts),
        _ungraded_line(assessment.ungraded),
        _notes_line(result),
        _rule_line(latest, rules),
    ) if part)
    return [_card(summary, "warning", detail, rules)]


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
    """MERGE: this is the one place where the assessment core (adapter/clinical/, `assess`) is wired.
    Replace the body with a call to it, passing records.patient, records.observations (ANC and
    temperature), records.chemotherapy, records.conditions and `now`, and map its result onto
    Assessment (counts, episode, febrile, context lines). Everything above renders an Assessment only."""
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
    counts = sorted(graded.values(), key=lambda g: (g[0].effective, g[0].observation_id), reverse=True)
    found = episodes.episodes(counts)
    open_episode = found[-1] if found and found[-1].closed_by is None else None
    return Assessment(counts=tuple(counts), ungraded=tuple(ungraded), episode=open_episode)


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


def _episode_line(episode: episodes.Episode | None) -> str:
    if episode is None or episode.first is episode.latest:
        return ""
    return (f"Neutropenic since {_when(episode.start)}: {len(episode.evidence)} abnormal counts in this "
            f"episode.")


def _counts_table(counts: Iterable[Graded]) -> str:
    rows = [f"| {_when(r.effective)} | {r.count} | {_label(c).lower()} |" for r, c in list(counts)[:RECENT_SHOWN]]
    return "Recent counts, newest first:\n\n| Taken | ANC (cells/µL) | Grade |\n|---|---|---|\n" + "\n".join(rows)


def _ungraded_line(reasons: tuple[str, ...]) -> str:
    if not reasons:
        return ""
    return (f"{len(reasons)} count(s) could not be graded and are not shown "
            f"({', '.join(sorted(set(reasons)))}).")


def _notes_line(result: Classification) -> str:
    return f"Note: {'; '.join(result.notes)}." if result.notes else ""


def _rule_line(graded: Graded, rules: Rules) -> str:
    reading, result = graded
    if rules.profile == "ctcae-v5":
        lln = reading.lln_per_ul if reading.lln_per_ul is not None else rules.default_lln
        bounds = ", ".join(f"grade {name[-1]} < {bound:g}" for name, bound in rules.mappings.thresholds.ctcae.bounds)
        lln_source = "the lab's reference range" if reading.lln_per_ul is not None else "`[classify] default_lln`"
        return (f"Rule: CTCAE v5 \"Neutrophil count decreased\": {bounds} cells/µL; grade 1 below the lower "
                f"limit of normal, {lln:g} cells/µL ({lln_source}).")
    table = _band_table(result.age_band, rules.mappings.thresholds)
    bounds = ", ".join(f"{name} < {bound:g}" for name, bound in table.bounds)
    return f"Rule: clinical profile, {_BAND_LABEL[result.age_band]}: {bounds} cells/µL."


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
