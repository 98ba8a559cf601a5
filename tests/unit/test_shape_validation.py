"""Each Flag / RiskAssessment shape is validated by the R4B model once, yet every resource that leaves is
valid: whatever ids, texts and dates fill the varying leaves, writeback._validated accepts exactly what
the model accepts."""

from __future__ import annotations

import copy
import dataclasses
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from adapter import mappings, writeback
from adapter.extract import is_fhir_id
from adapter.clinical import classify
from adapter.clinical.assess import Rules, assess
from adapter.clinical.context import Chemotherapy, Context, Temperature
from adapter.model import AgeBand, Classification, Count, Reading

SYSTEM = "https://hospital.example/fhir/anc-adapter"


def flag(reference="Patient/p1", value="p1/o5", text="Severe neutropenia: ANC 450 cells/µL",
         start="2026-11-01T08:00:00Z", detail="Observation/o5") -> dict:
    """The shape writeback._flag builds."""
    return {
        "resourceType": "Flag",
        "meta": {"tag": [{"system": f"{SYSTEM}/tag", "code": "anc-adapter"}]},
        "identifier": [{"system": f"{SYSTEM}/Flag", "value": value}],
        "extension": [{"url": writeback.FLAG_DETAIL, "valueReference": {"reference": detail}},
                      {"url": writeback.FLAG_PRIORITY, "valueCodeableConcept": {"coding": [
                          {"system": writeback.FLAG_PRIORITY_SYSTEM, "code": "PH"}]}}],
        "status": "active",
        "category": [{"coding": [writeback.FLAG_CATEGORY]}],
        "code": {"coding": [writeback.NEUTROPENIA], "text": text},
        "subject": {"reference": reference},
        "period": {"start": start},
        "author": writeback.AUTHOR,
    }


def risk(reference="Patient/p1", occurrence="2026-11-01T08:00:00Z", basis="Observation/o5") -> dict:
    return {
        "resourceType": "RiskAssessment",
        "identifier": [{"system": f"{SYSTEM}/RiskAssessment", "value": "p1/o5"}],
        "status": "final",
        "code": {"text": "Severe neutropenia"},
        "subject": {"reference": reference},
        "occurrenceDateTime": occurrence,
        "basis": [{"reference": basis}],
    }


def provenance(id="anc-0123abc", target="Flag/f1", recorded="2026-11-01T08:00:00Z", what=("Observation/o5",)) -> dict:
    """The shape writeback._provenance builds."""
    return {
        "resourceType": "Provenance",
        "id": id,
        "meta": {"tag": [{"system": f"{SYSTEM}/tag", "code": "anc-adapter"}]},
        "target": [{"reference": target}],
        "recorded": recorded,
        "agent": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                        "code": "assembler"}]}, "who": writeback.AUTHOR}],
        "entity": [{"role": "source", "what": {"reference": w}} for w in what],
    }


def model_accepts(resource_type: str, resource: dict) -> bool:
    try:
        writeback._MODELS[resource_type].model_validate(resource)
    except ValidationError:
        return False
    return True


def cached_accepts(resource_type: str, resource: dict) -> bool:
    try:
        writeback._validated(resource_type, resource)
    except ValidationError:
        return False
    return True


instants = st.datetimes(timezones=st.just(timezone.utc)).map(lambda d: d.isoformat().replace("+00:00", "Z"))
any_date = st.one_of(instants, st.text(max_size=30), st.from_regex(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z",
                                                                    fullmatch=True))


@settings(max_examples=300, deadline=None, database=None)
@given(reference=st.text(max_size=20), value=st.text(max_size=20), text=st.text(max_size=40), start=any_date,
       detail=st.text(max_size=20))
def test_a_flag_passes_the_shape_cache_exactly_when_the_model_accepts_it(reference, value, text, start, detail):
    writeback._validated("Flag", flag())  # the shape is known valid from here on
    resource = flag(reference, value, text, start, detail)
    assert cached_accepts("Flag", resource) == model_accepts("Flag", resource)


@settings(max_examples=200, deadline=None, database=None)
@given(reference=st.text(max_size=20), occurrence=any_date, basis=st.text(max_size=20))
def test_a_risk_assessment_passes_the_shape_cache_exactly_when_the_model_accepts_it(reference, occurrence, basis):
    writeback._validated("RiskAssessment", risk())
    resource = risk(reference, occurrence, basis)
    assert cached_accepts("RiskAssessment", resource) == model_accepts("RiskAssessment", resource)


@settings(max_examples=300, deadline=None, database=None)
@given(id=st.one_of(st.text(max_size=70), st.from_regex(r"[A-Za-z0-9\-.]{0,70}", fullmatch=True),
                    st.sampled_from(["a b", "a/b", "a_b", "é", "a\n", "", "a" * 64, "a" * 65, "anc-0123abc"])),
       target=st.text(max_size=20), recorded=any_date, what=st.lists(st.text(max_size=12), min_size=1, max_size=3))
def test_a_provenance_passes_the_shape_cache_exactly_when_the_model_accepts_it(id, target, recorded, what):
    writeback._validated("Provenance", provenance())
    resource = provenance(id, target, recorded, tuple(what))
    assert cached_accepts("Provenance", resource) == model_accepts("Provenance", resource)


def counted_validations(monkeypatch, kind: str) -> list[dict]:
    """Every resource of this kind the model validates from now on (the shape cache emptied first)."""
    calls: list[dict] = []
    real = writeback._MODELS[kind]

    class Counting:
        @staticmethod
        def model_validate(resource):
            calls.append(resource)
            return real.model_validate(resource)

    monkeypatch.setattr(writeback, "_VALID_SHAPES", set())
    monkeypatch.setitem(writeback._MODELS, kind, Counting)
    return calls


def test_a_provenance_is_validated_once_per_shape(monkeypatch):
    calls = counted_validations(monkeypatch, "Provenance")
    output = writeback.Output(system_base=SYSTEM, profile="clinical", provenance=True)
    for n in range(20):
        planned = writeback.Planned("Flag", f"p{n}/o{n}", f"p{n}", "active", f"h{n}", {}, None, (f"o{n}", "o-x"))
        writeback._provenance(planned, f"Flag/f{n}", output)
    assert len(calls) == 1
    writeback._provenance(writeback.Planned("Flag", "p/o", "p", "active", "h", {}, None, ("o1",)), "Flag/f", output)
    assert len(calls) == 2  # one source fewer: another shape


def test_the_model_runs_once_per_shape_and_again_for_a_new_shape(monkeypatch):
    calls = counted_validations(monkeypatch, "Flag")
    for n in range(50):
        writeback._validated("Flag", flag(f"Patient/p{n}", f"p{n}/o{n}", f"ANC {n} cells/µL",
                                          f"2026-11-{n % 28 + 1:02d}T08:00:00Z", f"Observation/o{n}"))
    assert len(calls) == 1
    ended = flag()
    ended["period"]["end"] = "2026-11-05T08:00:00Z"  # a closed episode: another shape
    writeback._validated("Flag", ended)
    changed = flag()
    changed["status"] = "inactive"  # a fixed leaf differs: another shape
    writeback._validated("Flag", changed)
    assert len(calls) == 3


def test_an_invalid_resource_is_refused_even_after_its_shape_was_seen_valid():
    writeback._validated("Flag", flag())
    for broken in (flag(reference=""), flag(start="2026-02-30T08:00:00Z"), flag(value=""),
                   {**flag(), "status": "not a code  "}):
        with pytest.raises(ValidationError):
            writeback._validated("Flag", copy.deepcopy(broken))


def nested_shape(parent, value, key=""):
    """The shape as nested tuples: the plain statement of what writeback._shape's flat tokens encode."""
    if isinstance(value, dict):
        return ("{}",) + tuple((k, nested_shape(key or parent, v, k)) for k, v in value.items())
    if isinstance(value, list):
        return ("[]",) + tuple(nested_shape(key or parent, v) for v in value)
    if isinstance(value, str) and key:
        if (parent, key) in writeback._STRING_LEAVES:
            if value and value.isprintable():
                return "<text>"
            raise writeback._Unshaped
        if (parent, key) in writeback._DATETIME_LEAVES:
            if writeback._INSTANT.fullmatch(value) and writeback._parses(value):
                return "<dateTime>"
            raise writeback._Unshaped
        if (parent, key) in writeback._ID_LEAVES:
            if is_fhir_id(value):
                return "<id>"
            raise writeback._Unshaped
    return type(value).__name__, value


def nested(resource):
    try:
        return nested_shape("", resource)
    except writeback._Unshaped:
        return None


# Few keys and few leaves, so that different resources often share a shape or nearly do: where a varying
# leaf sits (and where it does not), empty and nested containers next to each other, 1 / True / 1.0 / "1".
keys = st.sampled_from(["", "code", "text", "period", "start", "end", "identifier", "value", "subject",
                        "reference", "occurrenceDateTime", "status", "id", "recorded"])
leaves = st.sampled_from(["", "a", "b", "1", "\x00", "a b", "2026-11-01T08:00:00Z", "2026-11-02T08:00:00+01:00",
                          "2026-02-30T08:00:00Z", 1, 1.0, True, False, 0, None])
trees = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(keys, inner, max_size=3)), max_leaves=8)


def decoded(tokens):
    """Read the flat tokens back into the nested form: if this always gives the nested shape, two
    resources with one flat shape have one nested shape."""
    position = 1

    def value():
        nonlocal position
        token = tokens[position]
        position += 1
        if token is writeback._DICT:
            items = []
            while tokens[position] is not writeback._END:
                key = tokens[position]
                position += 1
                items.append((key, value()))
            position += 1
            return ("{}",) + tuple(items)
        if token is writeback._LIST:
            items = []
            while tokens[position] is not writeback._END:
                items.append(value())
            position += 1
            return ("[]",) + tuple(items)
        if token is writeback._TEXT:
            return "<text>"
        if token is writeback._DATETIME:
            return "<dateTime>"
        if token is writeback._ID:
            return "<id>"
        if type(token) is str:
            return "str", token
        position += 1
        return token.__name__, tokens[position - 1]

    shape = value()
    assert position == len(tokens)
    return shape


@settings(max_examples=500, deadline=None, database=None)
@given(resources=st.lists(st.dictionaries(keys, trees, max_size=4), min_size=2, max_size=6))
def test_two_resources_share_a_flat_shape_exactly_when_they_share_the_nested_one(resources):
    flat = [writeback._shape("Flag", r) for r in resources]
    plain = [nested(r) for r in resources]
    for a in range(len(resources)):
        assert (flat[a] is None) == (plain[a] is None)
        assert flat[a] is None or decoded(flat[a]) == plain[a]
        for b in range(len(resources)):
            if flat[a] is not None and flat[b] is not None:
                assert (flat[a] == flat[b]) == (plain[a] == plain[b])


def planned_flag(n: int, status: str = "active") -> writeback.Planned:
    resource = flag(f"Patient/p{n}", f"p{n}/o{n}")
    return writeback.Planned("Flag", f"p{n}/o{n}", f"p{n}", status, "h", resource)


OUTPUT = writeback.Output(system_base=SYSTEM, profile="clinical")


@given(st.text(max_size=12))
def test_every_plain_uri_is_one_the_bundle_model_accepts(text):
    from fhir.resources.R4B.bundle import Bundle

    if writeback._PLAIN_URI.fullmatch(text):
        Bundle.model_validate({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": text, "request": {"method": "PUT", "url": text}}]})


def test_a_transaction_validates_one_envelope_of_each_form(monkeypatch):
    seen = []
    real = writeback.Bundle

    class Counting:
        @staticmethod
        def model_validate(bundle):
            seen.append(len(bundle["entry"]))
            return real.model_validate(bundle)

    monkeypatch.setattr(writeback, "Bundle", Counting)
    bundle = writeback.transaction([planned_flag(n) for n in range(40)], OUTPUT)
    assert len(bundle["entry"]) == 40 and seen == [1]
    by_id = [*map(planned_flag, range(3)), dataclasses.replace(planned_flag(3), server_id="known-id")]
    writeback.transaction(by_id, OUTPUT)  # conditional PUTs and one PUT by id: still one form (uris alike)
    assert seen[-1] == 1


uri_parts = st.sampled_from(["p1", "o-1.x", "a/b", "a b", "é", "x\ty", "|", "", "%20", "\x7f"])


def _with_bundle_model(model, planned, output):
    real = writeback.Bundle
    writeback.Bundle = model
    try:
        return writeback.transaction(planned, output)
    finally:
        writeback.Bundle = real


@settings(max_examples=150)
@given(st.lists(st.tuples(uri_parts, uri_parts, st.one_of(st.none(), uri_parts)), min_size=1, max_size=6),
       st.booleans(), st.sampled_from(["https://h.example/anc", "https://h.example/a b"]), st.booleans())
def test_transaction_validates_the_envelopes_a_walk_of_each_picks(writes, provenance, base, client_ids):
    """transaction keys an envelope's form by its url alone; walking every envelope (_envelope_form), as it
    did before, picks the same envelopes in the same order, whatever the ids in the urls."""
    validated = []

    class Capturing:
        @staticmethod
        def model_validate(bundle):
            validated.append(bundle["entry"])

    output = writeback.Output(system_base=base, profile="clinical", provenance=provenance,
                              write_modes=(("Flag", "client-id"),) if client_ids else ())
    planned = [dataclasses.replace(planned_flag(n), identifier=f"{a}/{b}", server_id=server_id)
               for n, (a, b, server_id) in enumerate(writes)]
    walked: dict = {}
    for entry in _with_bundle_model(Capturing, planned, output)["entry"]:
        envelope = {k: v for k, v in entry.items() if k != "resource"}
        walked.setdefault(writeback._envelope_form(envelope), envelope)
    assert validated == [list(walked.values())]


def test_an_envelope_outside_the_plain_form_is_validated_itself():
    odd = [planned_flag(n) for n in range(3)]
    odd[1] = dataclasses.replace(odd[1], identifier="p1/o 1")  # a space in the conditional url
    forms = {writeback._envelope_form({k: v for k, v in e.items() if k != "resource"})
             for e in writeback.transaction(odd, OUTPUT)["entry"]}
    assert len(forms) == 2


# -- the shape _flag knows from how it built the Flag (writeback._flag's `built`) ----------------------------
RULES = Rules(profile="clinical", thresholds=mappings.load().thresholds)
START = datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)
# Ids and texts, mostly plain (so that many Flags share a built shape), some with the characters that leave
# the text class: empty, control, exotic white space.
odd_ids = st.sampled_from(["p1", "o1", "o2", "a-b.c", "x/y", "é", "a b"] * 6 + ["", "\x00", "o\u2028", "o\t", "\xa0"])
zones = st.sampled_from([timezone.utc] * 8 + [timezone(timedelta(hours=14)), timezone(timedelta(hours=-3, minutes=-30)),
                                              timezone(timedelta(hours=5, minutes=30, seconds=15))])  # not an instant
counts = st.tuples(odd_ids, st.integers(-60, 60), st.sampled_from([100, 420, 800, 1200, 1800, 2600, 4000]),
                   st.sampled_from(["", "<", ">"]), zones)


def assessment_of(patient_id, drawn, temperatures, chemotherapy, profile="clinical"):
    graded = []
    for observation_id, hours, anc, comparator, zone in drawn:
        reading = Reading(observation_id, "1", "final", patient_id, (START + timedelta(hours=hours)).astimezone(zone),
                          Count(anc, comparator))
        result = classify.classify(reading.count, AgeBand.ADULT, profile, RULES.thresholds, 2000)
        if isinstance(result, Classification):
            graded.append((reading, result))
    facts = Context(temperatures=tuple(Temperature(t, START + timedelta(hours=h), c) for t, h, c in temperatures),
                    chemotherapy=tuple(Chemotherapy(f"Procedure/{c}", START - timedelta(days=d), name)
                                       for c, name, d in chemotherapy))
    return assess(graded, facts, dataclasses.replace(RULES, profile=profile))


def episodes_of(patient_id, drawn, temperatures, chemotherapy, profile="clinical"):
    return assessment_of(patient_id, drawn, temperatures, chemotherapy, profile).episodes


patients = st.lists(st.tuples(odd_ids, odd_ids, st.lists(counts, min_size=1, max_size=4),
                              st.lists(st.tuples(odd_ids, st.integers(-60, 60),
                                                 st.sampled_from([37.0, 38.4, 39.2])), max_size=3),
                              st.lists(st.tuples(odd_ids, odd_ids, st.integers(1, 50)), max_size=1),
                              st.sampled_from(["inactive", "active"]),
                              st.sampled_from([SYSTEM, "https://other.example/fhir"]),
                              st.sampled_from(["clinical", "ctcae-v5"])),
                    min_size=1, max_size=12)


@settings(max_examples=300, deadline=None, database=None)
@given(patients=patients)
def test_a_flags_built_shape_stands_for_its_walked_shape(patients):
    """Where _flag says it knows the shape, walking the Flag finds a shape (and where it does not, the walk
    finds none), and two Flags with one built shape have one walked shape: so the cache keyed by the built
    shape holds exactly what the walked one would."""
    walked_by_built = {}
    for patient_id, identifier, drawn, temperatures, chemotherapy, status, system, profile in patients:
        output = writeback.Output(system_base=system, profile=profile)
        for assessed in episodes_of(patient_id, drawn, temperatures, chemotherapy, profile):
            body, built = writeback._flag(patient_id, identifier, assessed, output)
            walked = writeback._shape("Flag", {**body, "status": status})
            assert (built is None) == (walked is None)
            if built is not None:
                assert walked_by_built.setdefault((built, status), walked) == walked


_instant_zones = st.none() | st.just(timezone.utc) | st.builds(
    timezone, st.timedeltas(min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23, minutes=59)))
_moments = st.datetimes(timezones=_instant_zones)


@settings(max_examples=500, deadline=None, database=None)
@given(_moments | _moments.map(lambda moment: moment.replace(microsecond=0))
       | st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(1100, 1, 1), timezones=st.just(timezone.utc)))
def test_a_checked_instant_is_the_instant_and_its_class_as_the_walk_finds_them(moment):
    """_checked_instant's fast path (a whole-second UTC instant) and its general path give the text
    _instant writes and the class _is_instant finds for it: naive, offset, fractional and early moments."""
    text = writeback._instant(moment)
    assert writeback._checked_instant(moment) == (text, writeback._is_instant(text))


@settings(max_examples=300, deadline=None, database=None)
@given(_moments.filter(lambda moment: moment.tzinfo is not None))
def test_a_minute_is_strftimes_in_utc(moment):
    """_minute's fast path (a UTC moment) writes what strftime writes for it, in any zone."""
    assert writeback._minute(moment) == moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%MZ")


def test_a_flag_outside_its_built_shape_is_left_to_the_model(monkeypatch):
    [assessed] = episodes_of("p1", [("o1", 0, 420, "", timezone.utc)], [], [])
    output = writeback.Output(system_base=SYSTEM, profile="clinical")
    monkeypatch.setattr(writeback, "_VALID_SHAPES", set())
    body, built = writeback._flag("p1", "p1/o1", assessed, output)
    writeback._validated("Flag", {**body, "status": "active"}, (built, "active"))  # the shape is known valid
    body, built = writeback._flag("p1", "", assessed, output)  # an empty identifier value: not text
    assert built is None
    with pytest.raises(ValidationError):
        writeback._validated("Flag", {**body, "status": "active"}, None)


@settings(max_examples=300, deadline=None, database=None)
@given(patients=patients, method=st.sampled_from(["clinical", "ctcae-v5", "other"]))
def test_a_risk_assessments_built_shape_stands_for_its_walked_shape(patients, method):
    """The same for a RiskAssessment (writeback._risk_assessment's `built`). Its method code is the output's
    profile, drawn apart from the grading's here."""
    walked_by_built = {}
    for n, (patient_id, identifier, drawn, temperatures, chemotherapy, status, system, profile) in enumerate(patients):
        output = writeback.Output(system_base=system, profile=method if n % 2 else profile,
                                  resources=("RiskAssessment",))
        for assessed in assessment_of(patient_id, drawn, temperatures, chemotherapy, profile).counts:
            body, built = writeback._risk_assessment(patient_id, identifier, assessed, output)
            walked = writeback._shape("RiskAssessment", {**body, "status": status})
            assert (built is None) == (walked is None)
            if built is not None:
                assert walked_by_built.setdefault((built, status), walked) == walked
