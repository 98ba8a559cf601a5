"""Raw context resources -> typed facts, with explicit checks (liberal reading, like extract.py).

Temperatures (Observation), chemotherapy (MedicationAdministration, MedicationRequest, Procedure, with the
Medication a medicationReference points at) and a site's Duffy-null marker (Condition). A temperature we
cannot read safely is quarantined with a reason, never guessed; a record that no longer counts (withdrawn,
not done, refuted) becomes a fact of kind "none", which replaces what its earlier version said."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from adapter import extract
from adapter.clinical.context import Chemotherapy, Context, Temperature
from adapter.clinical.units import UCUM_SYSTEM
from adapter.mappings import ContextMappings
from adapter.model import Quarantine, Reason
from adapter.state import ContextFact

TYPES = ("Observation", "MedicationAdministration", "MedicationRequest", "Procedure", "Condition")
ATC = "http://www.whocc.no/atc"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
_ADMINISTERED = ("completed", "in-progress")
_REQUESTED = ("active", "completed")
# "order" and its specialisations in the FHIR request-intent hierarchy; proposals and plans are not orders.
_ORDER_INTENTS = ("order", "original-order", "reflex-order", "filler-order", "instance-order")
_ACTIVE_CONDITION = ("active", "recurrence", "relapse")  # "active" and its children (condition-clinical)
_NOT_A_CONDITION = ("entered-in-error", "refuted")


def fact(resource: Mapping[str, Any], mappings: ContextMappings, statuses: tuple[str, ...],
         medications: Mapping[str, Mapping[str, Any]]) -> ContextFact | Quarantine | None:
    """None when the resource is not one we can identify at all (no type we read, no usable id).
    `medications`: Medication resources by id, for a medicationReference."""
    kind = resource.get("resourceType")
    if kind not in TYPES or not extract.is_fhir_id(resource.get("id")):
        return None
    meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
    status = resource.get("status") if isinstance(resource.get("status"), str) else ""
    base = ContextFact(
        resource_type=str(kind), resource_id=str(resource["id"]),
        version=str(meta.get("versionId") or meta.get("lastUpdated") or "0"),
        patient_id=extract.patient_reference_id(resource.get("subject")) or "", kind="none", status=status,
        last_updated=str(meta.get("lastUpdated") or ""),
    )
    if kind == "Observation":
        return _temperature(resource, base, mappings, statuses)
    if kind == "Condition":
        return _condition(resource, base, mappings)
    return _chemotherapy(resource, base, mappings, medications)


_NO_CONTEXT = Context()


def context(facts: list[ContextFact]) -> Context:
    """Stored facts -> the pure core's Context."""
    if not facts:
        return _NO_CONTEXT  # most planned patients: nothing was found around their counts
    temperatures = tuple(
        Temperature(f.resource_id, f.time, f.value, f.name) for f in facts
        if f.kind == "temperature" and f.time is not None and f.value is not None
    )
    chemotherapy = tuple(
        Chemotherapy(f"{f.resource_type}/{f.resource_id}", f.time, f.name) for f in facts
        if f.kind == "chemotherapy" and f.time is not None
    )
    markers = tuple(f.resource_id for f in facts if f.kind == "duffy-null")
    return Context(temperatures, chemotherapy, markers)


def _temperature(resource: Mapping[str, Any], base: ContextFact, mappings: ContextMappings,
                 statuses: tuple[str, ...]) -> ContextFact | Quarantine:
    if base.status in extract.WITHDRAWN_STATUSES or base.status not in statuses:
        return base
    if not extract.has_code(resource, set(mappings.temperature_codes)):
        return base
    modified = extract.modifier_urls(resource) + extract.modifier_urls(resource.get("valueQuantity"))
    if modified:
        return Quarantine(Reason.UNKNOWN_MODIFIER, "modifierExtension " + ", ".join(sorted(set(modified))))
    if not base.patient_id:
        return Quarantine(Reason.NO_SUBJECT, "subject is missing or not a Patient reference")
    effective = extract.effective_time(resource)
    if isinstance(effective, Quarantine):
        return effective
    if not _has_time_of_day(resource):
        # The fever rule counts hours (24 h from the count, 60 min sustained): a date alone could put the
        # reading anywhere in a day, inside or outside the window. Never guessed.
        return Quarantine(Reason.NO_EFFECTIVE_TIME, "a temperature needs a time of day, not a date alone")
    quantity = resource.get("valueQuantity")
    if not isinstance(quantity, dict):
        return Quarantine(Reason.NO_VALUE, "dataAbsentReason" if "dataAbsentReason" in resource else "no valueQuantity")
    if quantity.get("comparator"):
        return Quarantine(Reason.UNGRADABLE_COMPARATOR, "a temperature with a comparator")
    spelling = quantity.get("code") if quantity.get("system") == UCUM_SYSTEM else (quantity.get("unit") or quantity.get("code"))
    unit = mappings.temperature_units.get(str(spelling).strip()) if isinstance(spelling, str) else None
    if unit is None:
        return Quarantine(Reason.UNKNOWN_UNIT, f"temperature unit {spelling!r} is not Cel, [degF] or an alias")
    value = quantity.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return Quarantine(Reason.IMPLAUSIBLE_VALUE, "temperature value is not a number")
    celsius = (value - 32) * 5 / 9 if unit == "[degF]" else float(value)
    low, high = mappings.plausible_celsius
    if not low <= celsius <= high:
        return Quarantine(Reason.IMPLAUSIBLE_VALUE, f"temperature outside {low:g}-{high:g} °C")
    recorded = f"{value:g} °F" if unit == "[degF]" else ""
    return _with(base, "temperature", effective, round(celsius, 6), recorded)


def _has_time_of_day(resource: Mapping[str, Any]) -> bool:
    """Does the time extract.effective_time used (the first of effective[x], then issued) carry a time?"""
    period = resource.get("effectivePeriod")
    for text in (resource.get("effectiveDateTime"), resource.get("effectiveInstant"),
                 period.get("start") if isinstance(period, dict) else None, resource.get("issued")):
        if text is not None:
            return isinstance(text, str) and "T" in text
    return False


def _chemotherapy(resource: Mapping[str, Any], base: ContextFact, mappings: ContextMappings,
                  medications: Mapping[str, Mapping[str, Any]]) -> ContextFact:
    kind = base.resource_type
    if kind == "MedicationAdministration":
        counts = base.status in _ADMINISTERED
        when = _first_time(resource.get("effectiveDateTime"), _start(resource.get("effectivePeriod")))
    elif kind == "MedicationRequest":
        counts = base.status in _REQUESTED and resource.get("intent") in _ORDER_INTENTS
        when = _first_time(resource.get("authoredOn"))
    else:  # Procedure
        counts = base.status == "completed"
        when = _first_time(resource.get("performedDateTime"), _start(resource.get("performedPeriod")))
    if not counts or when is None or not base.patient_id:
        return base  # not given, not done, withdrawn, or not placeable in time: says nothing
    code = resource.get("code") if kind == "Procedure" else _medication_code(resource, medications)
    name = _chemotherapy_name(code, mappings)
    return _with(base, "chemotherapy", when, None, name) if name else base


def _condition(resource: Mapping[str, Any], base: ContextFact, mappings: ContextMappings) -> ContextFact:
    if not mappings.duffy_null_codes or not extract.has_code(resource, set(mappings.duffy_null_codes)):
        return base
    clinical = _codes(resource.get("clinicalStatus"))
    verification = _codes(resource.get("verificationStatus"))
    if not clinical & set(_ACTIVE_CONDITION) or verification & set(_NOT_A_CONDITION):
        return base
    return ContextFact(base.resource_type, base.resource_id, base.version, base.patient_id, "duffy-null",
                       "active", last_updated=base.last_updated)


def _medication_code(resource: Mapping[str, Any], medications: Mapping[str, Mapping[str, Any]]) -> Any:
    if isinstance(resource.get("medicationCodeableConcept"), dict):
        return resource["medicationCodeableConcept"]
    reference = resource.get("medicationReference")
    target = reference.get("reference") if isinstance(reference, dict) else None
    if isinstance(target, str) and "Medication/" in target:
        medication = medications.get(target.rsplit("Medication/", 1)[1].split("/_history")[0])
        if isinstance(medication, Mapping):
            return medication.get("code")
    return None


def is_chemotherapy(system: Any, code: Any, mappings: ContextMappings) -> bool:
    """Is this coding on a chemotherapy list of mappings/context.toml? The one test for a record `run`
    reads and for an order `serve` sees at order-sign."""
    if not isinstance(code, str):
        return False
    return ((system == ATC and bool(mappings.atc_prefixes) and code.startswith(mappings.atc_prefixes))
            or (system == RXNORM and code in mappings.rxnorm)
            or (system == SNOMED and code in mappings.snomed_procedures))


def _chemotherapy_name(code: Any, mappings: ContextMappings) -> str:
    """The name the text shows when the code is on a chemotherapy list, else "" (not chemotherapy).
    The matching coding's display, else the concept's text, else our list's name, else the code."""
    if not isinstance(code, dict) or not isinstance(code.get("coding"), list):
        return ""
    text = code.get("text") if isinstance(code.get("text"), str) else ""
    for coding in code["coding"]:
        if not isinstance(coding, dict) or not isinstance(coding.get("code"), str):
            continue
        system, value = coding.get("system"), coding["code"]
        if is_chemotherapy(system, value, mappings):
            display = coding.get("display") if isinstance(coding.get("display"), str) else ""
            fallback = mappings.rxnorm.get(value, "") if system == RXNORM else ""
            return (display or text or fallback or value).strip()
    return ""


def _codes(concept: Any) -> set[str]:
    codings = concept.get("coding") if isinstance(concept, dict) else None
    return {c["code"] for c in codings or [] if isinstance(c, dict) and isinstance(c.get("code"), str)}


def _start(period: Any) -> Any:
    return period.get("start") if isinstance(period, dict) else None


def _first_time(*candidates: Any) -> datetime | None:
    for text in candidates:
        if text is not None:
            return extract.parse_datetime(text)
    return None


def _with(base: ContextFact, kind: str, time: datetime, value: float | None, name: str) -> ContextFact:
    return ContextFact(base.resource_type, base.resource_id, base.version, base.patient_id, kind, base.status,
                       time, value, name, base.last_updated)
