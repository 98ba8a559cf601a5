"""Raw Observation / Patient JSON -> the few fields we need, with explicit checks (liberal reading).

Full model validation of every resource read would cost ~270 µs each (DOMAIN.md §7) and would reject an
Observation over an unrelated odd element; we check exactly the fields we use instead."""

from __future__ import annotations

import calendar
import functools
import re
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any, Collection, Mapping

from adapter.clinical import units
from adapter.mappings import Coding, Mappings
from adapter.model import Count, DeriveInput, InputKind, Patient, Quarantine, Reading, Reason

WITHDRAWN_STATUSES = ("entered-in-error", "cancelled")


# Seen and Extracted are not frozen, unlike the domain types: one is built for every Observation read,
# only to be read by the caller that asked for it (never hashed, stored or shared), and a frozen
# dataclass sets each field through object.__setattr__, four times the cost of a plain one.
@dataclass(slots=True)
class Seen:
    """Identity of one Observation version, whatever became of it."""

    observation_id: str
    version: str
    status: str
    last_updated: str  # the server's meta.lastUpdated, as sent
    patient_id: str  # "" when the subject is missing or not a Patient


@dataclass(slots=True)
class Extracted(Seen):
    """An Observation version's identity (it is its own `seen`) and what it gives."""

    outcome: Reading | DeriveInput | Quarantine | None  # None: withdrawn, or not for us (status/code)

    @property
    def seen(self) -> Seen:
        # One object per Observation read instead of two: the identity is not copied into a Seen of its own.
        return self


def observation(
    resource: Mapping[str, Any],
    mappings: Mappings,
    statuses: tuple[str, ...],
    input_kinds: Mapping[Coding, InputKind] | None = None,
) -> Extracted | None:
    """None when the resource is not an identifiable Observation at all (counted as malformed).
    `input_kinds` (derived ANC on) also accepts the inputs of a derived ANC."""
    common = _common_reading(resource, mappings, statuses)
    return common if common is not None else _observation(resource, mappings, statuses, input_kinds)


_NO_META: dict[str, Any] = {}  # read only


def _common_reading(resource: Mapping[str, Any], mappings: Mappings, statuses: tuple[str, ...]) -> Extracted | None:
    """The shape nearly every count read has, graded in one pass: a status we read, one coding that is
    an ANC code, a "Patient/<id>" subject, an effectiveDateTime, a valueQuantity with a number and a known
    unit, no referenceRange, no modifierExtension. None for anything else, even when only unusual: then
    _observation, the general path, decides (and states the reason of a quarantine). This path only
    skips the general path's detours, so it must never return what that would not
    (tests/unit/test_extract_fast_path.py compares them on odd inputs)."""
    # Every field is fetched and type-checked up front: any surprise falls back before work is done.
    meta = resource.get("meta") or _NO_META
    status = resource.get("status")
    code = resource.get("code")
    subject = resource.get("subject")
    effective = resource.get("effectiveDateTime")
    quantity = resource.get("valueQuantity")
    if (resource.get("resourceType") != "Observation" or resource.get("modifierExtension")
            or "referenceRange" in resource or type(meta) is not dict or type(status) is not str
            or type(code) is not dict or type(subject) is not dict or type(effective) is not str
            or type(quantity) is not dict or quantity.get("modifierExtension")
            or status in WITHDRAWN_STATUSES or status not in statuses):
        return None
    codings = code.get("coding")
    if type(codings) is not list or len(codings) != 1 or type(codings[0]) is not dict:
        return None
    system, anc_code = codings[0].get("system"), codings[0].get("code")
    if type(system) is not str or type(anc_code) is not str or (system, anc_code) not in _code_set(mappings.anc_codes):
        return None
    observation_id = resource.get("id")
    reference = subject.get("reference")
    if not is_fhir_id(observation_id) or type(reference) is not str:
        return None
    patient_id = _patient_in(reference)
    when = parse_datetime(effective)
    if patient_id is None or when is None:
        return None
    # The value, its comparator and unit by the general path's own rules: a count it would quarantine goes
    # back to it, which states the reason.
    count = units.normalise(quantity, mappings.unit_aliases, mappings.thresholds.max_anc_per_ul)
    if type(count) is not Count:
        return None
    last_updated = meta.get("lastUpdated")
    version = str(meta.get("versionId") or last_updated or "0")
    return Extracted(observation_id, version, status, str(last_updated or ""), patient_id,
                     Reading(observation_id, version, status, patient_id, when, count))


def _observation(
    resource: Mapping[str, Any],
    mappings: Mappings,
    statuses: tuple[str, ...],
    input_kinds: Mapping[Coding, InputKind] | None = None,
) -> Extracted | None:
    """observation(), for every shape."""
    if resource.get("resourceType") != "Observation" or not is_fhir_id(resource.get("id")):
        return None
    # Raw JSON is checked with isinstance(..., dict): an ABC check (Mapping) costs ~10x more per field.
    meta = resource.get("meta")
    if not isinstance(meta, dict):
        meta = {}
    status = resource.get("status")
    if not isinstance(status, str):
        status = ""
    extracted = Extracted(
        observation_id=resource["id"],
        version=str(meta.get("versionId") or meta.get("lastUpdated") or "0"),
        status=status,
        last_updated=str(meta.get("lastUpdated") or ""),
        patient_id=patient_reference_id(resource.get("subject")) or "",
        outcome=None,
    )
    if status in WITHDRAWN_STATUSES or status not in statuses:
        return extracted
    if has_code(resource, _code_set(mappings.anc_codes)):
        extracted.outcome = _reading(resource, extracted, mappings)
        return extracted
    kind = _input_kind(resource, input_kinds or {})
    if kind is not None:
        extracted.outcome = _derive_input(resource, extracted, kind, mappings)
    return extracted


def _usable(resource: Mapping[str, Any], seen: Seen) -> datetime | Quarantine:
    """Checks every Observation we act on must pass; its effective time when it does."""
    quantity = resource.get("valueQuantity")
    # modifier_urls lists something only where modifierExtension is truthy: almost never, so look first.
    modified = modifier_urls(resource) + modifier_urls(quantity) if resource.get("modifierExtension") or (
        isinstance(quantity, dict) and quantity.get("modifierExtension")) else []
    if modified:
        # FHIR: a reader that does not understand a modifierExtension must not act on the resource as
        # if it were not there. We understand none.
        return Quarantine(Reason.UNKNOWN_MODIFIER, "modifierExtension " + ", ".join(sorted(set(modified))))
    if not seen.patient_id:
        return Quarantine(Reason.NO_SUBJECT, "subject is missing or not a Patient reference")
    return effective_time(resource)


def _derive_input(resource: Mapping[str, Any], seen: Seen, kind: InputKind, mappings: Mappings) -> DeriveInput | Quarantine:
    effective = _usable(resource, seen)
    if isinstance(effective, Quarantine):
        return effective
    quantity = resource.get("valueQuantity")
    if not isinstance(quantity, dict):
        return Quarantine(Reason.NO_VALUE, "no valueQuantity")
    if quantity.get("comparator"):
        return Quarantine(Reason.UNGRADABLE_COMPARATOR, "a derived-ANC input with a comparator")
    if kind.is_count:
        limit = _MAX_WBC_PER_UL if kind is InputKind.WBC else mappings.thresholds.max_anc_per_ul
        count = units.normalise(quantity, mappings.unit_aliases, limit)
        if isinstance(count, Quarantine):
            return count
        value = count.anc_per_ul
    else:
        value = quantity.get("value")
        unit = quantity.get("code") if quantity.get("system") == units.UCUM_SYSTEM else quantity.get("unit")
        if unit != "%":
            return Quarantine(Reason.UNKNOWN_UNIT, f"percentage input in {unit!r}, expected '%'")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
            return Quarantine(Reason.IMPLAUSIBLE_VALUE, "percentage outside 0-100")
    return DeriveInput(seen.observation_id, seen.version, seen.patient_id, effective, kind, float(value))


# Leukocyte counts reach a few hundred thousand per µL in leukaemia; beyond a million is a unit slip.
_MAX_WBC_PER_UL = 1_000_000


def _reading(resource: Mapping[str, Any], seen: Seen, mappings: Mappings) -> Reading | Quarantine:
    effective = _usable(resource, seen)
    if isinstance(effective, Quarantine):
        return effective
    quantity = resource.get("valueQuantity")
    if quantity is None:
        detail = "dataAbsentReason" if "dataAbsentReason" in resource else "no valueQuantity"
        return Quarantine(Reason.NO_VALUE, detail)
    count = units.normalise(quantity, mappings.unit_aliases, mappings.thresholds.max_anc_per_ul)
    if isinstance(count, Quarantine):
        return count
    return Reading(
        observation_id=seen.observation_id,
        version=seen.version,
        status=seen.status,
        patient_id=seen.patient_id,
        effective=effective,
        count=count,
        lln_per_ul=_reference_low(resource, mappings),
    )


def effective_time(resource: Mapping[str, Any]) -> datetime | Quarantine:
    """effectiveDateTime, effectiveInstant or effectivePeriod.start, else issued (CONTRACT §3): the first
    one present decides."""
    text = resource.get("effectiveDateTime")
    if text is None:
        text = resource.get("effectiveInstant")
    if text is None:
        period = resource.get("effectivePeriod")
        text = period.get("start") if isinstance(period, dict) else None
    if text is None:
        text = resource.get("issued")
    if text is None:
        return Quarantine(Reason.NO_EFFECTIVE_TIME, "no effective[x] and no issued")
    parsed = parse_datetime(text)
    if parsed is None:
        return Quarantine(Reason.NO_EFFECTIVE_TIME, "effective time unparseable or less precise than a day")
    return parsed


_DATETIME = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})(?:T(?P<time>\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)(?P<tz>Z|[+-]\d{2}:\d{2})?)?$"
)


# What servers send nearly always (to the second or finer, with an offset), in ASCII digits: text of this
# shape is also of the shape _DATETIME reads, with an offset, and needs neither stripping nor its groups.
_COMMON_DATETIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?(?:Z|[+-][0-9]{2}:[0-9]{2})")


def parse_datetime(text: Any) -> datetime | None:
    """FHIR dateTime/instant at day precision or finer. A date alone is taken as 00:00 UTC that day."""
    if not isinstance(text, str):
        return None
    if _COMMON_DATETIME.fullmatch(text):
        try:
            parsed = datetime.fromisoformat(text)
            # An offset (under a day) can carry an instant out of the calendar only from its first or
            # last year: only there is the check below needed.
            if parsed.year == 1 or parsed.year == 9999:
                parsed.astimezone(timezone.utc)
        except (ValueError, OverflowError):
            return None
        return parsed
    return _parse_datetime(text)


def _parse_datetime(text: str) -> datetime | None:
    """parse_datetime(), for every shape."""
    text = text.strip()
    match = _DATETIME.match(text)
    if not match:
        return None
    day, time, offset = match.groups()
    try:
        if not time:
            return datetime.fromisoformat(day).replace(tzinfo=timezone.utc)
        # The pattern matched all of `text`, which Python (3.11+) reads as it is, "Z" included: twice a
        # count (its effective time and its lastUpdated), so it is not rebuilt from its parts.
        parsed = datetime.fromisoformat(text if offset else text + "+00:00")
        parsed.astimezone(timezone.utc)  # a year-9999 instant with a negative offset cannot be ordered
    except (ValueError, OverflowError):
        return None
    return parsed


def latest_datetime(texts: Collection[str]) -> datetime | None:
    """The latest instant of these texts (by parse_datetime); None when none of them parses."""
    # A page's lastUpdated values, as servers write them, share one shape: UTC ("Z") and the same digits
    # after the second. Then the greatest text is the latest instant (the fields are fixed-width, the
    # same in each, most significant first), and only that one is parsed, when it parses at all.
    # (Nothing may come before the year: parse_datetime ignores spaces, which sort before digits.)
    width = len(next(iter(texts), ""))
    if all(len(text) == width and text[-1:] == "Z" and text[:1] in _DIGITS for text in texts):
        latest = parse_datetime(max(texts, default=""))
        if latest is not None:
            return latest
    return max((parsed for parsed in map(parse_datetime, texts) if parsed is not None), default=None)


_DIGITS = frozenset("0123456789")


def utc_text(moment: Any, seconds: bool = True) -> str | None:
    """A UTC datetime with a four-digit year as text, "YYYY-MM-DDTHH:MM:SS" (or to the minute), without its
    zone; to the second only when it has no fraction of one. What isoformat and strftime write for it, put
    together from its parts in a half to a quarter of their time: nearly every instant we write back (a
    count's time, a Flag's period, a projection's) is one. None for any other moment: the caller's general
    path formats it."""
    if type(moment) is not datetime or moment.tzinfo is not timezone.utc or moment.year < 1000:
        return None
    minute = (f"{moment.year}-{_TWO_DIGITS[moment.month]}-{_TWO_DIGITS[moment.day]}"
              f"T{_TWO_DIGITS[moment.hour]}:{_TWO_DIGITS[moment.minute]}")
    if not seconds:
        return minute
    return None if moment.microsecond else f"{minute}:{_TWO_DIGITS[moment.second]}"


_TWO_DIGITS = tuple(f"{number:02d}" for number in range(100))


def patient(resource: Mapping[str, Any]) -> Patient | None:
    if resource.get("resourceType") != "Patient" or not is_fhir_id(resource.get("id")):
        return None
    earliest, latest = _birth_range(resource.get("birthDate"))
    return Patient(patient_id=resource["id"], born_earliest=earliest, born_latest=latest)


def _birth_range(text: Any) -> tuple[date | None, date | None]:
    if not isinstance(text, str):
        return None, None
    try:
        parts = [int(p) for p in text.split("-")]
        if len(parts) == 3:
            born = date(*parts)
            return born, born
        if len(parts) == 2:
            year, month = parts
            return date(year, month, 1), date(year, month, calendar.monthrange(year, month)[1])
        if len(parts) == 1:
            return date(parts[0], 1, 1), date(parts[0], 12, 31)
    except ValueError:
        pass
    return None, None


def _codings(resource: Mapping[str, Any]) -> list[Coding]:
    code = resource.get("code")
    codings = code.get("coding") if isinstance(code, dict) else None
    if not isinstance(codings, list):
        return []
    # Only text can match a code; anything else (a list, an object) would also be unhashable and stop the
    # whole run on one malformed Observation, every run.
    return [(c.get("system"), c.get("code")) for c in codings
            if isinstance(c, dict) and isinstance(c.get("system"), str) and isinstance(c.get("code"), str)]


def has_code(resource: Mapping[str, Any], wanted: set[Coding] | frozenset[Coding]) -> bool:
    """Does `code.coding` hold one of these (system, code) pairs? (Counts, temperatures, markers.)"""
    return not wanted.isdisjoint(_codings(resource))


@functools.lru_cache(maxsize=16)
def _code_set(codes: tuple[Coding, ...]) -> frozenset[Coding]:
    # The mapping's codes as a set once, not once per Observation read.
    return frozenset(codes)


def _input_kind(resource: Mapping[str, Any], kinds: Mapping[Coding, InputKind]) -> InputKind | None:
    return next((kinds[c] for c in _codings(resource) if c in kinds), None)


def _reference_low(resource: Mapping[str, Any], mappings: Mappings) -> float | None:
    ranges = resource.get("referenceRange")
    if not isinstance(ranges, list) or not ranges or not isinstance(ranges[0], dict):
        return None
    low = ranges[0].get("low")
    if not isinstance(low, dict):
        return None
    count = units.normalise(low, mappings.unit_aliases, mappings.thresholds.max_anc_per_ul)
    return None if isinstance(count, Quarantine) or count.comparator else count.anc_per_ul


_PATIENT_REF = re.compile(r"(?:^|/)Patient/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


def patient_reference_id(subject: Any) -> str | None:
    """The Patient id a reference names (relative, absolute or versioned); None for anything else."""
    if not isinstance(subject, dict) or not isinstance(subject.get("reference"), str):
        return None
    return _patient_in(subject["reference"])


@functools.lru_cache(maxsize=4096)
def _patient_in(reference: str) -> str | None:
    # A patient's counts come together (a page holds several of each): its reference is matched once.
    match = _PATIENT_REF.search(reference)
    return match["id"] if match else None


def modifier_urls(element: Any) -> list[str]:
    """The urls of an element's modifierExtensions ("?" where unreadable): any at all means we do not
    understand the resource well enough to act on it."""
    extensions = element.get("modifierExtension") if isinstance(element, dict) else None
    if not extensions:
        return []
    if not isinstance(extensions, list):
        return ["?"]
    return [str(e.get("url", "?")) if isinstance(e, dict) else "?" for e in extensions]


_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def is_fhir_id(value: Any) -> bool:
    """A FHIR resource id: 1-64 of [A-Za-z0-9-.]."""
    return isinstance(value, str) and _FHIR_ID.fullmatch(value) is not None


# -- what state keeps of a quarantined Observation ---------------------------------------------------------
# An allowlist of exactly what `observation()` reads, so that retrying the kept copy after a mapping fix
# gives the outcome the full resource would, while names and free text (subject.display, performer,
# note, text, contained, identifiers, any display) never reach the state file. A denylist would keep
# whatever a server adds next (an extension carrying a name, a new free-text element); a field that
# extraction starts reading must be added here too (tests/unit/test_extract_retry_copy.py compares the
# outcomes). Unit and comparator strings are kept as sent: a unit is exactly what a mapping fix matches.
_EFFECTIVE_FIELDS = ("effectiveDateTime", "effectiveInstant", "issued")


def kept_for_retry(resource: Mapping[str, Any]) -> dict[str, Any]:
    """The part of an Observation that state keeps while it is quarantined."""
    kept: dict[str, Any] = {key: resource[key] for key in ("resourceType", "id", "status") if key in resource}
    meta = resource.get("meta")
    if isinstance(meta, dict):
        kept["meta"] = {key: meta[key] for key in ("versionId", "lastUpdated") if key in meta}
    subject = resource.get("subject")
    if isinstance(subject, dict):
        # Only a Patient reference is read; anything else there is text of unknown content.
        kept["subject"] = {"reference": subject["reference"]} if patient_reference_id(subject) else {}
    code = resource.get("code")
    if isinstance(code, dict):
        kept["code"] = _codes_only(code)
    for key in _EFFECTIVE_FIELDS:
        if key in resource:
            kept[key] = _time_only(resource[key])
    period = resource.get("effectivePeriod")
    if isinstance(period, dict):
        kept["effectivePeriod"] = {"start": _time_only(period["start"])} if "start" in period else {}
    if "valueQuantity" in resource:
        quantity = resource["valueQuantity"]
        kept["valueQuantity"] = None if quantity is None else _quantity_only(quantity)
    if "dataAbsentReason" in resource:  # only its presence is read
        reason = resource["dataAbsentReason"]
        kept["dataAbsentReason"] = _codes_only(reason) if isinstance(reason, dict) else {}
    ranges = resource.get("referenceRange")
    if isinstance(ranges, list) and ranges and isinstance(ranges[0], dict) and isinstance(ranges[0].get("low"), dict):
        kept["referenceRange"] = [{"low": _quantity_only(ranges[0]["low"])}]  # only the first range's low is read
    if "modifierExtension" in resource:
        kept["modifierExtension"] = _modifier_urls_only(resource["modifierExtension"])
    return kept


def _codes_only(concept: Mapping[str, Any]) -> dict[str, Any]:
    codings = concept.get("coding")
    if not isinstance(codings, list):
        return {}
    return {"coding": [{key: c[key] for key in ("system", "code") if key in c}
                       for c in codings if isinstance(c, dict)]}


def _time_only(value: Any) -> Any:
    # An unparseable time is quarantined whatever it said: its text need not be kept.
    return value if value is None or parse_datetime(value) is not None else "unparseable"


def _quantity_only(quantity: Any) -> Any:
    if not isinstance(quantity, dict):
        return ""  # still not a Quantity
    kept = {key: quantity[key] for key in ("comparator", "unit", "system", "code") if key in quantity}
    if "value" in quantity:
        value = quantity["value"]
        kept["value"] = value if value is None or isinstance(value, (int, float)) else "not a number"
    if "modifierExtension" in quantity:
        kept["modifierExtension"] = _modifier_urls_only(quantity["modifierExtension"])
    return kept


def _modifier_urls_only(extensions: Any) -> Any:
    if not extensions:
        return []
    if not isinstance(extensions, list):
        return "?"
    return [({"url": e["url"]} if "url" in e else {}) if isinstance(e, dict) else None for e in extensions]
