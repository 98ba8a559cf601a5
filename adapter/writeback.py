"""An assessment -> Flag / RiskAssessment resources (CONTRACT §6), planned against what we wrote before, sent
as one transaction of conditional updates keyed by our identifiers, so a repeat never duplicates. The
clinical reasoning is done by adapter.clinical.assess; this module only renders what it found."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cached_property, lru_cache
from typing import Any

import orjson
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.flag import Flag
from fhir.resources.R4B.provenance import Provenance
from fhir.resources.R4B.riskassessment import RiskAssessment

from adapter.clinical.assess import (
    PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_MEDIUM, AssessedCount, AssessedEpisode, Assessment,
)
from adapter.clinical.context import Fever, days_before, shown_celsius
from adapter.clinical.episodes import Episode
from adapter.errors import PermanentHttpError
from adapter.extract import is_fhir_id, utc_text
from adapter.model import Grade
from adapter.state import Written

SNOMED = "http://snomed.info/sct"
NEUTROPENIA = {"system": SNOMED, "code": "165517008", "display": "Neutropenia"}
INFECTIOUS_DISEASE = {"system": SNOMED, "code": "40733004", "display": "Infectious disease"}
FEBRILE_NEUTROPENIA = {"system": SNOMED, "code": "409089005", "display": "Febrile neutropenia"}
FLAG_CATEGORY = {
    "system": "http://terminology.hl7.org/CodeSystem/flag-category",
    "code": "clinical",
    "display": "Clinical",
}
FLAG_DETAIL = "http://hl7.org/fhir/StructureDefinition/flag-detail"
FLAG_PRIORITY = "http://hl7.org/fhir/StructureDefinition/flag-priority"
FLAG_PRIORITY_SYSTEM = "http://hl7.org/fhir/flag-priority-code"
RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"
QUALITATIVE_RISK = {
    Grade.SEVERE: "high", Grade.MODERATE: "moderate", Grade.MILD: "low", Grade.NORMAL: "negligible",
    Grade.CTCAE_4: "high", Grade.CTCAE_3: "moderate", Grade.CTCAE_2: "low", Grade.CTCAE_1: "low",
    Grade.CTCAE_0: "negligible",
}
AUTHOR = {"display": "anc-adapter"}
# Parts of every Flag that depend on nothing (or only on its priority), built once like the codings above.
_FLAG_CATEGORIES = [{"coding": [FLAG_CATEGORY]}]
_PRIORITY_EXTENSIONS = {
    code: {"url": FLAG_PRIORITY, "valueCodeableConcept": {"coding": [{"system": FLAG_PRIORITY_SYSTEM, "code": code}]}}
    for code in (PRIORITY_HIGH, PRIORITY_MEDIUM, PRIORITY_LOW)
}
WITHDRAWN = ("entered-in-error", "cancelled")
_MODELS = {"Flag": Flag, "RiskAssessment": RiskAssessment, "Provenance": Provenance}


@dataclass(frozen=True)
class Output:
    """What [output] and [classify] say about the resources we write."""

    system_base: str
    profile: str
    resources: tuple[str, ...] = ("Flag",)
    risk_assessment_for_normal: bool = False
    write_modes: tuple[tuple[str, str], ...] = ()  # (resource type, "conditional" | "client-id")
    bundle_type: str = "transaction"  # "batch" where the server has no transactions
    provenance: bool = False  # a Provenance per write, naming the Observations as source entities

    def request(self, resource_type: str, identifier: str) -> tuple[str, str | None]:
        """The PUT url that makes this write idempotent, and the id the resource must carry (if any)."""
        if self.write_mode.get(resource_type, "conditional") == "conditional":
            return f"{resource_type}?identifier={self.identifier_system(resource_type)}|{identifier}", None
        resource_id = stable_id(self.identifier_system(resource_type), identifier)
        return f"{resource_type}/{resource_id}", resource_id

    def identifier_system(self, resource_type: str) -> str:
        return f"{self.system_base}/{resource_type}"

    @property
    def grade_system(self) -> str:
        return f"{self.system_base}/CodeSystem/neutropenia-grade"

    # What depends on the Output alone is built once, not for each resource (building these dicts and
    # strings was a tenth of rendering a Flag). Every resource then holds the same dicts, as it holds
    # NEUTROPENIA and AUTHOR: nothing here, in the sinks or in the client changes a resource once built.
    @cached_property
    def meta(self) -> dict[str, Any]:
        """The meta of every resource we write: our tag, which tells our resources from others'."""
        return {"tag": [{"system": f"{self.system_base}/tag", "code": "anc-adapter"}]}

    @cached_property
    def write_mode(self) -> dict[str, str]:
        return dict(self.write_modes)

    @cached_property
    def identifier_systems(self) -> dict[str, str]:
        return {kind: self.identifier_system(kind) for kind in _MODELS}

    @cached_property
    def grade_codings(self) -> dict[Grade, dict[str, str]]:
        return {grade: {"system": self.grade_system, "code": grade.value, "display": grade.label} for grade in Grade}


@dataclass(frozen=True)
class Planned:
    """One change: the validated resource, and what state records once the server accepted it.
    `send` is False when only our bookkeeping changes (a Flag's evidence grew, its content did not)."""

    resource_type: str
    identifier: str
    patient_id: str
    status: str
    content_hash: str
    resource: dict[str, Any]
    server_id: str | None = None  # known from an earlier write: update that resource by id
    evidence: tuple[str, ...] = ()
    send: bool = True

    def written(self, server_id: str | None) -> Written:
        return Written(self.resource_type, self.identifier, self.patient_id, self.status,
                       self.content_hash, server_id or self.server_id, self.evidence)


def plan_patient(
    patient_id: str,
    assessment: Assessment,
    previously: dict[str, list[Written]],
    output: Output,
    unread: frozenset[str] = frozenset(),
) -> list[Planned]:
    """Everything that must change on the server for one patient; nothing when it already says it.
    `unread`: evidence of earlier Flags that this state has never read (a Flag adopted from the server
    after state loss, whose Observations later pages will bring) — such a Flag is not judged yet."""
    planned: list[Planned] = []
    if "Flag" in output.resources:
        planned += _plan_flags(patient_id, assessment, previously.get("Flag", []), output, unread)
    if "RiskAssessment" in output.resources:
        planned += _plan_risk_assessments(patient_id, assessment, previously.get("RiskAssessment", []), output)
    return planned


def _plan_flags(patient_id: str, assessment: Assessment, previously: list[Written], output: Output,
                unread: frozenset[str] = frozenset()) -> list[Planned]:
    """One Flag per episode. An episode keeps the Flag whose evidence it shares, so a late older count,
    a backfilled earlier episode or a withdrawn count never renumbers or swaps the patient's Flags. An
    episode sharing nothing takes over a Flag whose evidence is all gone (a measured count replacing a
    derived one, a result re-filed), else gets a new identifier from its first abnormal Observation
    (deterministic, so a rerun after a crash finds the same one). A Flag left over is entered-in-error."""
    before = {w.identifier: w for w in previously}
    found = [assessed.episode for assessed in assessment.episodes]
    # Most patients planned have no Flag yet: nothing to match, keep or withdraw.
    claimed, pending = _claims(patient_id, found, previously, unread) if previously else ({}, set())
    wanted: dict[str, tuple[str, dict[str, Any], frozenset[str], tuple[Any, ...] | None]] = {}
    for index, episode in enumerate(found):
        match = claimed.get(index)
        identifier = match.identifier if match else _new_identifier(patient_id, episode, before, wanted)
        status = "active" if episode.closed_by is None else "inactive"
        body, built = _flag(patient_id, identifier, assessment.episodes[index], output)
        wanted[identifier] = (status, body, episode.evidence, built)
    for identifier, written in before.items():
        if identifier not in wanted and written.status != "entered-in-error" and identifier not in pending:
            # No remaining evidence: withdrawn, amended away, or merged into an older episode.
            wanted[identifier] = ("entered-in-error", _withdrawn_flag(patient_id, identifier, output),
                                  frozenset(written.evidence), None)
    return [
        planned
        for identifier, (status, body, evidence, built) in sorted(wanted.items())
        if (planned := _plan("Flag", identifier, patient_id, status, body, before.get(identifier),
                             tuple(sorted(evidence)), built=built))
    ]


def _claims(patient_id: str, found: list[Episode], previously: list[Written],
            unread: frozenset[str]) -> tuple[dict[int, Written], set[str]]:
    """Which earlier Flag each episode keeps (by the episode's index), and the identifiers of the Flags
    not judged yet (their evidence unread)."""
    live = [w for w in previously if w.status != "entered-in-error"]  # never revive a retracted Flag
    claimed: dict[int, Written] = {}
    for index, episode in enumerate(found):
        natural = scoped(patient_id, episode.first[0].observation_id)
        candidates = [w for w in live if w not in claimed.values()
                      and (episode.evidence & set(w.evidence) or w.identifier == natural)]
        if candidates:
            # The Flag named after this episode's first count is the surest match (after state loss its
            # evidence may not have been read yet); then the one sharing the most evidence.
            claimed[index] = max(candidates, key=lambda w: (w.identifier == natural,
                                                            len(episode.evidence & set(w.evidence)),
                                                            w.identifier))
    current = set().union(*(e.evidence for e in found)) if found else set()
    pending = {w.identifier for w in live if w not in claimed.values() and set(w.evidence) & unread}
    orphans = [w for w in live if w not in claimed.values() and not current & set(w.evidence)
               and w.identifier not in pending]
    for index in reversed(range(len(found))):  # the most recent episode first
        if index not in claimed and orphans:
            claimed[index] = orphans.pop()
    return claimed, pending


def _new_identifier(patient_id: str, episode: Episode, taken: dict[str, Any], wanted: dict[str, Any]) -> str:
    base = scoped(patient_id, episode.first[0].observation_id)
    identifier, n = base, 1
    while identifier in taken or identifier in wanted:
        n += 1
        identifier = f"{base}/{n}"
    return identifier


def scoped(patient_id: str, observation_id: str) -> str:
    """An identifier value scoped to the patient. '/' cannot occur in a FHIR id, so two pairs of ids can
    never give the same value (with '-', patient 'x-1' + 'o' and patient 'x' + '1-o' would collide)."""
    return f"{patient_id}/{observation_id}"


def _plan_risk_assessments(
    patient_id: str, assessment: Assessment, previously: list[Written], output: Output
) -> list[Planned]:
    before = {w.identifier: w for w in previously}
    wanted: dict[str, tuple[str, dict[str, Any], tuple[str, ...], str | None, tuple[Any, ...] | None]] = {}
    for assessed in assessment.counts:
        reading, result = assessed.graded
        # Scoped to the patient: a result re-filed to another patient gets a new assessment there while
        # the old patient's is withdrawn — one identifier for both would make the two writes collide.
        identifier = scoped(patient_id, reading.observation_id)
        if not (result.grade.abnormal or output.risk_assessment_for_normal or identifier in before):
            continue
        body, built = _risk_assessment(patient_id, identifier, assessed, output)
        prior = before.get(identifier)
        content_hash = _hash(body)
        changed = prior is not None and (not _same_content(prior.content_hash, body, content_hash)
                                         or prior.status in WITHDRAWN)
        status = "amended" if changed else (prior.status if prior else "final")
        wanted[identifier] = (status, body, reading.evidence, content_hash, built)
    for identifier, written in before.items():
        if identifier not in wanted and written.status not in WITHDRAWN:
            body = _withdrawn_risk_assessment(patient_id, identifier, output)
            wanted[identifier] = ("entered-in-error", body, written.evidence, None, None)
    return [
        planned
        for identifier, (status, body, evidence, content_hash, built) in sorted(wanted.items())
        if (planned := _plan("RiskAssessment", identifier, patient_id, status, body, before.get(identifier),
                             evidence, content_hash, built))
    ]


def _plan(
    resource_type: str, identifier: str, patient_id: str, status: str, body: dict[str, Any],
    prior: Written | None, evidence: tuple[str, ...] = (), content_hash: str | None = None,
    built: tuple[Any, ...] | None = None,
) -> Planned | None:
    """`content_hash`: _hash(body), when the caller has it already; `built`: the body's shape as its
    builder knows it (see _flag, _risk_assessment), else the resource is walked for its shape."""
    content_hash = content_hash or _hash(body)
    server_id = prior.server_id if prior else None
    if prior is not None and prior.status == status and _same_content(prior.content_hash, body, content_hash):
        if prior.evidence == evidence and prior.content_hash == content_hash:
            return None
        # Only our bookkeeping changes: the evidence grew, or the hash was stored in its earlier form.
        return Planned(resource_type, identifier, patient_id, status, content_hash, {}, server_id, evidence,
                       send=False)
    resource = _validated(resource_type, {**body, "status": status}, (built, status) if built else None)
    return Planned(resource_type, identifier, patient_id, status, content_hash, resource, server_id, evidence)


def transaction(planned: Iterable[Planned], output: Output) -> dict[str, Any]:
    """One transaction (or batch) per page; each entry an idempotent PUT (see Output.request).
    A batch is not atomic: if any entry fails, `accepted` raises, state keeps nothing of the page, and
    the next run repeats the entries that did succeed, harmlessly."""
    entries: list[dict[str, Any]] = []
    # Each resource was validated when planned; the envelopes (type, fullUrl, request) are validated below, one
    # of each form (`_envelope_form`): validating all 500 took about 10 ms a bundle. Every envelope here has
    # the same keys, a fullUrl that is a urn:uuid (a plain uri) and the method PUT, so its form is fixed by
    # its request url alone: keyed by that url's class, instead of walking each envelope for its form
    # (two µs a write), the same envelopes are picked (tests/unit/test_shape_validation.py).
    forms: dict[Any, dict[str, Any]] = {}
    for p in planned:
        if p.server_id:  # we know its id: a plain update, no search, whatever the server says it supports
            url, resource_id = f"{p.resource_type}/{p.server_id}", p.server_id
        else:
            url, resource_id = output.request(p.resource_type, p.identifier)
        resource = {**p.resource, "id": resource_id} if resource_id else p.resource
        full_url = f"urn:uuid:{_uuid_like(p.resource_type, p.identifier)}"
        _add_entry(entries, forms, full_url, resource, url)
        if output.provenance:
            # The target is the entry's fullUrl unless we know the id: the server resolves it inside the
            # transaction (a batch-only server needs ids we know; cli refuses provenance without either).
            target = f"{p.resource_type}/{resource_id}" if resource_id else full_url
            provenance = _provenance(p, target, output)
            _add_entry(entries, forms, f"urn:uuid:{_uuid_like('Provenance', provenance['id'])}", provenance,
                       f"Provenance/{provenance['id']}")
    Bundle.model_validate({"resourceType": "Bundle", "type": output.bundle_type, "entry": list(forms.values())})
    return {"resourceType": "Bundle", "type": output.bundle_type, "entry": entries}


def _add_entry(entries: list[dict[str, Any]], forms: dict[Any, dict[str, Any]], full_url: str,
               resource: dict[str, Any], url: str) -> None:
    """A PUT of `resource` to `url`; its envelope kept in `forms` when it is the first of its form."""
    request = {"method": "PUT", "url": url}
    entries.append({"fullUrl": full_url, "resource": resource, "request": request})
    form = _URI if _PLAIN_URI.fullmatch(url) else url  # = _envelope_form's, given the fullUrl is plain
    if form not in forms:
        forms[form] = {"fullUrl": full_url, "request": request}


# A class of uris each of which the R4B model accepts: printable ASCII without white space (within the uri
# pattern \S*; the model accepts any string there, tests/unit/test_shape_validation.py).
_PLAIN_URI = re.compile(r"[!-~]+")


def _envelope_form(envelope: dict[str, Any]) -> tuple[Any, ...]:
    """An entry's envelope with each uri (fullUrl, request.url) of the plain class replaced by that class: two
    envelopes of one form are valid alike. Anything else is kept as it is, so it is validated itself."""
    return tuple((key, _classed(key, value)) for key, value in envelope.items())


def _classed(key: str, value: Any) -> Any:
    if type(value) is str:  # tested first: most of an envelope (not a closure: one per entry cost a µs)
        return _URI if key in _URI_KEYS and _PLAIN_URI.fullmatch(value) else value
    return value if not isinstance(value, dict) else tuple((k, _classed(k, v)) for k, v in value.items())


_URI_KEYS = frozenset({"fullUrl", "url"})


def accepted(planned: list[Planned], response: dict[str, Any], output: Output) -> list[tuple[Written, bool]]:
    """Check the transaction-response entry by entry; raise unless the server accepted every write.
    Returns what state records, and whether the server created (201) rather than updated it."""
    entries = response.get("entry") if response.get("resourceType") == "Bundle" else None
    per_write = 2 if output.provenance else 1  # each write, then its Provenance
    if not isinstance(entries, list) or len(entries) != per_write * len(planned):
        raise PermanentHttpError("transaction answered without one response entry per write")
    for extra in entries[1::2] if output.provenance else ():
        answer = extra.get("response") if isinstance(extra, dict) else None
        status = str(answer.get("status", "")) if isinstance(answer, dict) else ""
        if status[:1] != "2":
            raise PermanentHttpError(f"the server did not accept a Provenance write ({status or '?'})",
                                     status=int(status[:3]) if status[:3].isdigit() else None)
    written = []
    for plan, entry in zip(planned, entries[::per_write]):
        answer = entry.get("response") if isinstance(entry, dict) else None
        status = str(answer.get("status", "")) if isinstance(answer, dict) else ""
        if not status[:1] == "2":
            code = int(status[:3]) if status[:3].isdigit() else None
            raise PermanentHttpError(f"the server did not accept a {plan.resource_type} write ({status or '?'})",
                                     status=code)
        server_id = _server_id(plan.resource_type, answer.get("location"), entry)
        written.append((plan.written(server_id), status.startswith("201")))
    return written


def adoptable(resources: list[dict[str, Any]], output: Output) -> list[Written]:
    """Our Flags as found on the server, as state would have recorded them. The content hash is left
    empty so the next plan rewrites them (by id); the Observation in flag-detail is their evidence."""
    adopted = []
    for flag in resources:
        identifier = next((i.get("value") for i in flag.get("identifier") or []
                           if isinstance(i, dict) and i.get("system") == output.identifier_system("Flag")), None)
        reference = (flag.get("subject") or {}).get("reference", "")
        if flag.get("resourceType") != "Flag" or not identifier or not reference.startswith("Patient/"):
            continue
        details = [e.get("valueReference", {}).get("reference", "") for e in flag.get("extension") or []
                   if isinstance(e, dict) and e.get("url") == FLAG_DETAIL]
        # Only the first flag-detail is a count; the others point at temperatures and chemotherapy,
        # which this state never ledgers (taking them as evidence would leave the Flag unjudged).
        evidence = tuple(d.removeprefix("Observation/") for d in details[:1] if d.startswith("Observation/"))
        adopted.append(Written("Flag", identifier, reference.removeprefix("Patient/"), str(flag.get("status")),
                               "", flag.get("id"), evidence))
    return adopted


def _flag(patient_id: str, identifier: str, assessed: AssessedEpisode,
          output: Output) -> tuple[dict[str, Any], tuple[Any, ...] | None]:
    """The Flag's body (_plan adds its status), and its shape as known from how it is built here: every
    part of it is fixed by the values in `built`, except six kinds of strings — the identifier value, the
    flag-detail references, code.text, the subject reference (text class) and the period's start and end
    (dateTime class). When each of those is in its class (the same checks _shape makes), two Flags with
    equal `built` have equal shapes, so `built` stands for the shape without walking the Flag (the walk
    was half of planning a Flag). None when one is not: the Flag is then walked, and validated by the
    model. tests/unit/test_shape_validation.py checks both against _shape."""
    episode, latest = assessed.episode, assessed.latest
    reading, result = latest.graded
    grade, fever, priority = result.grade, assessed.fever, assessed.priority
    (start, start_in_class), end = _checked_instant(episode.start), episode.end
    end_in_class = True
    if end is None:
        period = {"start": start}
    else:
        end, end_in_class = _checked_instant(end)
        period = {"start": start, "end": end}
    coding = [NEUTROPENIA, _grade_coding(grade, output)] if fever is None \
        else [NEUTROPENIA, _grade_coding(grade, output), FEBRILE_NEUTROPENIA]
    # The first flag-detail is the Observation behind the current grade (readers and adoption rely on
    # it); then the context the text names.
    details = [f"Observation/{reading.evidence[0]}"] + _context_references(latest, fever)
    text = _text(latest, fever)
    subject = f"Patient/{patient_id}"
    body = {
        "resourceType": "Flag",
        **_common(output, "Flag", identifier),
        "extension": [{"url": FLAG_DETAIL, "valueReference": {"reference": d}} for d in details]
        + [_PRIORITY_EXTENSIONS[priority]],
        "category": _FLAG_CATEGORIES,
        "code": {"coding": coding, "text": text},
        "subject": {"reference": subject},
        "period": period,
        "author": AUTHOR,
    }
    if not (type(identifier) is str and _is_text(identifier) and _is_text(text) and _is_text(subject)
            and all(map(_is_text, details)) and start_in_class and end_in_class):
        return body, None
    # output.system_base fixes meta, the identifier system and the grade coding (all built from it alone).
    built = (_BUILT_FLAG, output.system_base, grade, fever is not None, priority, len(details), end is not None)
    return body, built


def _context_references(assessed: AssessedCount, fever: Fever | None) -> list[str]:
    """The temperature Observations and the chemotherapy record the text names, each once."""
    if fever is None and assessed.chemotherapy is None:
        return []  # most counts: no context was found around them
    references = [f"Observation/{t.observation_id}" for t in fever.readings] if fever else []
    if assessed.chemotherapy is not None:
        references.append(assessed.chemotherapy.reference)
    return list(dict.fromkeys(references))


def _withdrawn_flag(patient_id: str, identifier: str, output: Output) -> dict[str, Any]:
    return {
        "resourceType": "Flag",
        **_common(output, "Flag", identifier),
        "category": _FLAG_CATEGORIES,
        "code": {"coding": [NEUTROPENIA], "text": "Neutropenia alert withdrawn: its results were withdrawn"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "author": AUTHOR,
    }


def _risk_assessment(patient_id: str, identifier: str, assessed: AssessedCount,
                     output: Output) -> tuple[dict[str, Any], tuple[Any, ...] | None]:
    """The RiskAssessment's body (_plan adds its status), and its shape as known from how it is built, as
    for a Flag (see _flag): everything but the identifier value, code.text, the subject and basis
    references, the projection's rationale (text class) and the occurrence and projection times (dateTime
    class) is fixed by the values in `built`. None when one of those leaves is outside its class."""
    reading, result = assessed.graded
    risk = "high" if assessed.fever is not None else QUALITATIVE_RISK[result.grade]
    predictions: list[dict[str, Any]] = [
        {
            # SNOMED CT 40733004 "Infectious disease (disorder)" is the root concept HL7 Europe's Hospital
            # Discharge Report IG uses for infections: the nearest standard code for "serious infection".
            # Our own code stays beside it, since receivers may already match on it.
            "outcome": {
                "coding": [{"system": f"{output.system_base}/CodeSystem/outcome", "code": "serious-infection"},
                           INFECTIOUS_DISEASE],
                "text": "Serious infection",
            },
            "qualitativeRisk": {"coding": [{"system": RISK_PROBABILITY, "code": risk}]},
        }
    ]
    occurrence, instants_in_class = _checked_instant(reading.effective)
    varying_texts = [identifier]
    if assessed.projection is not None:
        end, end_in_class = _checked_instant(reading.effective + timedelta(hours=48))
        start, instants_in_class = occurrence, instants_in_class and end_in_class
        rationale = (f"Log-linear projection from the previous count (Observation/"
                     f"{assessed.projection.earlier_observation_id}) and this one: the same ratio "
                     f"per hour continues; below 500 cells/µL by {_minute(assessed.projection.below_by)}")
        predictions.append({
            "outcome": {
                "coding": [{"system": f"{output.system_base}/CodeSystem/outcome", "code": "anc-below-500"}],
                "text": "ANC below 500 cells/µL",
            },
            "whenPeriod": {"start": start, "end": end},
            "rationale": rationale,
        })
        varying_texts.append(rationale)
    text = _text(assessed, assessed.fever)
    subject = f"Patient/{patient_id}"
    basis = [f"Observation/{source}" for source in reading.evidence] + _context_references(assessed, assessed.fever)
    references = [*dict.fromkeys(basis), subject]
    body = {
        "resourceType": "RiskAssessment",
        **_common(output, "RiskAssessment", identifier),
        "method": {"coding": [{"system": f"{output.system_base}/CodeSystem/method", "code": output.profile}]},
        "code": {"coding": [_grade_coding(result.grade, output)], "text": text},
        "subject": {"reference": subject},
        "occurrenceDateTime": occurrence,
        "basis": [{"reference": r} for r in references],
        "prediction": predictions,
    }
    if not (type(identifier) is str and all(_is_text(t) for t in [*varying_texts, text, *references])
            and instants_in_class):
        return body, None
    # output.system_base fixes meta, the identifier, outcome and method systems and the grade coding.
    built = (_BUILT_RISK_ASSESSMENT, output.system_base, output.profile, result.grade, risk,
             assessed.projection is not None, len(references))
    return body, built


def _provenance(planned: Planned, target: str, output: Output) -> dict[str, Any]:
    """Who wrote this version, from which Observations. Its id is derived from what was written, so a
    retried write rewrites the same Provenance instead of adding another (R4 Provenance has no identifier)."""
    version = f"{planned.resource_type}|{planned.identifier}|{planned.status}|{planned.content_hash}"
    sources = planned.evidence
    resource = {
        "resourceType": "Provenance",
        "id": stable_id(output.identifier_system("Provenance"), version),
        "meta": output.meta,
        "target": [{"reference": target}],
        "recorded": _instant(datetime.now(timezone.utc).replace(microsecond=0)),
        "agent": [{
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                 "code": "assembler"}]},
            "who": AUTHOR,
        }],
        "entity": [{"role": "source", "what": {"reference": f"Observation/{source}"}} for source in sources],
    }
    # Once per shape, as the resources it follows (validating each took about 250 µs, a write).
    return _validated("Provenance", resource)


def _withdrawn_risk_assessment(patient_id: str, identifier: str, output: Output) -> dict[str, Any]:
    return {
        "resourceType": "RiskAssessment",
        **_common(output, "RiskAssessment", identifier),
        "subject": {"reference": f"Patient/{patient_id}"},
        "note": [{"text": "The Observation behind this assessment was withdrawn or can no longer be graded."}],
    }


def _common(output: Output, resource_type: str, identifier: str) -> dict[str, Any]:
    return {
        "meta": output.meta,
        "identifier": [{"system": output.identifier_systems[resource_type], "value": identifier}],
    }


def _grade_coding(grade: Grade, output: Output) -> dict[str, str]:
    return output.grade_codings[grade]


def _text(assessed: AssessedCount, fever: Fever | None) -> str:
    """code.text: the count as today, led by the fever when febrile, then the context facts the data
    shows (projection, chemotherapy, a site-marked threshold), joined with "; "."""
    reading, result = assessed.reading, assessed.result
    label = f"At least {result.grade.label[0].lower()}{result.grade.label[1:]}" if result.at_least else result.grade.label
    text = f"{label}: ANC {reading.count} cells/µL on {reading.effective.date().isoformat()}"
    if result.notes:
        text += f" ({'; '.join(result.notes)})"
    if fever is not None:
        text = f"Febrile neutropenia: {_fever_text(fever)} with {text[0].lower()}{text[1:]}"
    if assessed.projection is None and assessed.chemotherapy is None and assessed.duffy_null_floor is None:
        return text  # most counts: no context fact to add
    parts = [text]
    if assessed.projection is not None:
        parts.append(f"projected to fall below 500 cells/µL by {_minute(assessed.projection.below_by)}")
    if assessed.chemotherapy is not None:
        chemo = assessed.chemotherapy
        days = days_before(chemo, reading.effective)
        parts.append(f"after chemotherapy: {chemo.name} on {chemo.time.date().isoformat()} "
                     f"({days} days before this count)")
    if assessed.duffy_null_floor is not None:
        parts.append(f"site-marked Duffy-null threshold: normal from {assessed.duffy_null_floor:g} cells/µL")
    return "; ".join(parts)


def _fever_text(fever: Fever) -> str:
    if fever.sustained:
        first, last = fever.readings[0], fever.readings[-1]
        return f"temperature ≥ {fever.threshold:.1f} °C from {_minute(first.time)} to {_minute(last.time)}"
    reading = fever.readings[0]
    recorded = f" ({reading.recorded} as recorded)" if reading.recorded else ""
    return f"temperature {shown_celsius(reading.celsius)} °C{recorded} at {_minute(reading.time)}"


def _minute(moment: datetime) -> str:
    """An ISO instant to the minute, in UTC: 2026-11-20T10:00Z."""
    # A projection's time and a temperature's are nearly always UTC already (strftime took four times as long).
    text = utc_text(moment, seconds=False)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%MZ") if text is None else text + "Z"


def _instant(moment: Any) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _checked_instant(moment: datetime) -> tuple[str, bool]:
    """_instant(moment), and whether it is in the dateTime class of _shape (_is_instant): each Flag's period
    and each RiskAssessment's occurrence, about a tenth of planning one. Nearly every count is a
    whole-second UTC instant with a four-digit year, whose text is put together from its parts (isoformat
    took twice as long) and is always in the class — every field of a real date and time is within the
    pattern, and Python parses what isoformat writes — so it is not matched and parsed again. Any other
    moment takes the general path. tests/unit/test_shape_validation.py checks that both agree."""
    text = utc_text(moment)
    if text is not None:
        return text + "Z", True
    text = _instant(moment)
    return text, _is_instant(text)


def _validated(resource_type: str, resource: dict[str, Any], built: tuple[Any, ...] | None = None) -> dict[str, Any]:
    """Validate with the R4B model and send exactly what was validated; re-serialising the model would
    cost more than the validation itself and change nothing we build. The model runs once per shape (see
    _shape): validating every Flag was a third of the adapter's CPU, for resources that differ only in
    ids, dates and text. `built`: the shape as the resource's builder knows it (see _flag), instead of
    walking the resource for it."""
    shape = built or _shape(resource_type, resource)
    if shape is None or shape not in _VALID_SHAPES:
        _MODELS[resource_type].model_validate(resource)
        if shape is not None:
            if len(_VALID_SHAPES) >= _MAX_SHAPES:
                _VALID_SHAPES.clear()  # bounded; a new run of shapes is validated again
            _VALID_SHAPES.add(shape)
    return resource


def _is_text(value: str) -> bool:
    """In the text class of _shape (a plain str is the caller's to check). The one definition of the class
    for both the walk and the builders' keys (_flag, _risk_assessment): that they agree is what makes a
    built key stand for a walked shape."""
    return bool(value) and value.isprintable()


def _is_instant(value: str) -> bool:
    """In the dateTime class of _shape."""
    return _INSTANT.fullmatch(value) is not None and _parses(value)


# Leaves whose values vary from one resource to the next, by (the nearest enclosing key, key) and the FHIR
# type the R4B models give them there. Everything else in a shape is kept as it is.
_STRING_LEAVES = frozenset({("identifier", "value"), ("subject", "reference"), ("valueReference", "reference"),
                            ("code", "text"), ("basis", "reference"), ("prediction", "rationale"),
                            ("target", "reference"), ("what", "reference")})
# Provenance.recorded is an `instant`: the model checks the dateTime pattern's full form (seconds and zone
# required) and a real date and time, which every string of the dateTime class is.
_DATETIME_LEAVES = frozenset({("period", "start"), ("period", "end"), ("whenPeriod", "start"),
                              ("whenPeriod", "end"), ("", "occurrenceDateTime"), ("", "recorded")})
# A Provenance's id (stable_id): the id class holds what extract.is_fhir_id accepts, 1 to 64 of FHIR's id
# characters (the R4B models allow up to 255 of them).
_ID_LEAVES = frozenset({("", "id")})
# An instant to the second (at most microseconds) with a zone: what _instant writes.
_INSTANT = re.compile(r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?"
                      r"(Z|[+-]((0\d|1[0-3]):[0-5]\d|14:00))")
_MAX_SHAPES = 4096
_VALID_SHAPES: set[tuple[Any, ...]] = set()
# Tokens of a shape (see _shape): unique objects, equal to nothing a resource can hold.
_TEXT, _DATETIME, _ID, _DICT, _LIST, _END, _URI = (object() for _ in range(7))
# Leads a Flag's shape as _flag knows it: such a shape never equals a walked one (a tuple of tokens).
_BUILT_FLAG = object()
_BUILT_RISK_ASSESSMENT = object()  # the same for a RiskAssessment
# Each varying leaf's class by its enclosing key, then its key: a dict looks its table up once, and most
# dicts have none (building a (parent, key) pair for every string leaf was a seventh of the walk).
_LEAF_CLASSES = {**dict.fromkeys(_STRING_LEAVES, _TEXT), **dict.fromkeys(_DATETIME_LEAVES, _DATETIME),
                 **dict.fromkeys(_ID_LEAVES, _ID)}
_VARYING = {parent: {key: leaf_class for (p, key), leaf_class in _LEAF_CLASSES.items() if p == parent}
            for parent, _ in _LEAF_CLASSES}
_FIXED: dict[Any, object] = {}  # the table of a dict without varying leaves


class _Unshaped(Exception):
    """A leaf this module cannot class: the resource is validated by the model, as any other would be."""


def _shape(resource_type: str, resource: dict[str, Any]) -> tuple[Any, ...] | None:
    """The resource with each varying leaf replaced by its class; None if a leaf fits no class.

    Why two resources of one shape are both valid or both invalid: the R4B models check a `string` only
    for being non-empty (the pattern `[ \\r\\n\\t\\S]+`), and a `dateTime` for its pattern and for being
    a real date and time. The text class holds only non-empty, printable strings (no control or exotic
    white-space characters on which Python's and pydantic's regex engines could differ), all valid as a
    string; the dateTime class only strings matching the stricter pattern above that Python also parses,
    all valid as a dateTime (and as an instant); the id class only ids FHIR allows. Every other leaf,
    every key, every list length is kept exactly.

    The shape is one flat tuple of tokens, written in one walk (nested tuples built by generators cost
    more than a third of planning a Flag): a dict is _DICT, then each key and its value, then _END; a
    list is _LIST, its items, _END; a fixed string is itself, any other fixed leaf its type then itself;
    a varying leaf its class. Read from the start, the tokens give back the tree, so two resources have
    one shape only when the nested form would be equal too. Anything but plain dicts, lists and
    strings where those occur (a subclass) is left to the model."""
    tokens: list[Any] = [resource_type]
    try:
        _walk_dict("", resource, tokens.append)
    except _Unshaped:
        return None
    return tuple(tokens)


# The walk dispatches on the exact type where it meets an item (dict, list, string, other leaf): a Flag
# has some thirty containers, and a call less for each is a sixth of its walk.
def _walk_dict(parent: str, value: Any, emit: Any) -> None:
    if type(value) is not dict:
        raise _Unshaped
    emit(_DICT)
    varying_keys = _VARYING.get(parent, _FIXED)
    for key, item in value.items():
        emit(key)
        kind = type(item)
        if kind is str:
            varying = varying_keys.get(key)
            if varying is None:
                emit(item)
            elif varying is _TEXT:
                if not _is_text(item):
                    raise _Unshaped
                emit(_TEXT)
            elif varying is _DATETIME:
                if not _is_instant(item):
                    raise _Unshaped
                emit(_DATETIME)
            else:
                if not is_fhir_id(item):
                    raise _Unshaped
                emit(_ID)
        elif kind is dict:
            _walk_dict(key or parent, item, emit)
        elif kind is list:
            _walk_list(key or parent, item, emit)
        else:
            _walk_leaf(item, kind, emit)
    emit(_END)


def _walk_list(parent: str, items: list[Any], emit: Any) -> None:
    emit(_LIST)
    for item in items:
        kind = type(item)
        if kind is str:
            emit(item)  # a list's strings are never varying leaves
        elif kind is dict:
            _walk_dict(parent, item, emit)
        elif kind is list:
            _walk_list(parent, item, emit)
        else:
            _walk_leaf(item, kind, emit)
    emit(_END)


def _walk_leaf(item: Any, kind: type, emit: Any) -> None:
    """Anything but a plain string, dict or list: a subclass of one left to the model, any other leaf
    kept with its type."""
    if isinstance(item, (str, dict, list)):
        raise _Unshaped
    emit(kind)
    emit(item)


def _parses(value: str) -> bool:
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


# A content hash names its form, so a state written before this form still compares (`_same_content`).
_HASH_FORM = "h2:"


def _hash(body: dict[str, Any]) -> str:
    """What we wrote, in 35 characters: whether a resource must be sent again is decided by comparing
    these. orjson's sorted compact JSON: the standard library's json.dumps took 30 µs a Flag, orjson 4."""
    return _HASH_FORM + hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def _same_content(stored: str, body: dict[str, Any], content_hash: str) -> bool:
    """Does the stored hash say `body`? A hash of the earlier form (32 hex digits, from json.dumps with sorted
    keys) is compared in that form: upgrading must not resend every resource we wrote. `_plan` then records
    the hash in the current form (bookkeeping, nothing sent), so each resource is compared the old way
    once. An empty hash (a Flag adopted from the server) matches nothing."""
    if stored == content_hash:
        return True
    return bool(stored) and not stored.startswith(_HASH_FORM) and stored == _legacy_hash(body)


def _legacy_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


def stable_id(system: str, value: str) -> str:
    """A FHIR id (≤ 64 of [A-Za-z0-9-.]) that is a pure function of our identifier."""
    return "anc-" + hashlib.sha256(f"{system}|{value}".encode()).hexdigest()[:40]


def _uuid_like(resource_type: str, identifier: str) -> str:
    digest = hashlib.sha256(f"{resource_type}|{identifier}".encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def _server_id(resource_type: str, location: Any, entry: dict[str, Any]) -> str | None:
    if isinstance(location, str):
        match = _location_pattern(resource_type).search(location)
        if match:
            return match.group(1)
    resource = entry.get("resource")
    return resource.get("id") if isinstance(resource, dict) else None


@lru_cache(maxsize=None)  # one per resource type we write
def _location_pattern(resource_type: str) -> re.Pattern[str]:
    """Compiled once, not looked up in re's cache (a µs) for every write the server accepted."""
    return re.compile(rf"{resource_type}/([A-Za-z0-9\-.]{{1,64}})")
