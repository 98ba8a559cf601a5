"""The documentation in docs/ stays true to the code.

- Every config key of adapter/config.py is in docs/configuration.md (with its default) and in
  config/adapter.example.toml, so a key added later cannot go undocumented.
- Every environment variable the adapter reads, every quarantine reason and every exit code is documented.
- docs/examples/*.json are what `anc-adapter run` reads and posts for a small fixed scenario (the real
  command end to end, against a mocked FHIR server). When what it writes changes, this test fails;
  regenerate with

      ANC_REGENERATE_DOCS=1 .venv/bin/python -m pytest tests/unit/test_docs.py

  review the diff (it is the change your users will see on their server) and commit it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import tempfile
import tomllib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from adapter import config
from adapter import mappings as mappings_module
from adapter.errors import ExitCode
from adapter.model import Reason

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
REGENERATE = "ANC_REGENERATE_DOCS=1 .venv/bin/python -m pytest tests/unit/test_docs.py"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
RECORDED = "2026-11-20T08:20:03Z"


# -- configuration reference -------------------------------------------------------------------------

def _config_keys() -> list[tuple[str, str, Any]]:
    """(section, key, default) for every key of every section dataclass of Config; a nested table (a
    dataclass inside a section) is its own section, `[section.table]`."""
    keys: list[tuple[str, str, Any]] = []

    def walk(section: str, defaults: Any) -> None:
        for key in dataclasses.fields(defaults):
            value = getattr(defaults, key.name)
            if dataclasses.is_dataclass(value):
                walk(f"{section}.{key.name}", value)
            else:
                keys.append((section, key.name, value))

    for section in dataclasses.fields(config.Config):
        walk(section.name, section.default_factory())  # type: ignore[misc]
    return keys


def _toml_literal(value: Any) -> str:
    """A default as TOML spells it, which is how docs/configuration.md shows it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _doc_rows(markdown: str) -> dict[tuple[str, str], list[str]]:
    """Table rows of configuration.md under `### [section]` headings: (section, key) -> cells."""
    rows: dict[tuple[str, str], list[str]] = {}
    section = None
    for line in markdown.splitlines():
        heading = re.match(r"^#{2,4} `\[(?P<name>[\w.]+)\]`", line)
        if heading:
            section = heading["name"]
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        key = re.fullmatch(r"`(\w+)`", cells[0]) if cells else None
        if section and key:
            rows.setdefault((section, key[1]), cells)  # the reference row comes first in its section
    return rows


CONFIG_KEYS = _config_keys()


@pytest.mark.parametrize("section,key,default", CONFIG_KEYS, ids=[f"{s}.{k}" for s, k, _ in CONFIG_KEYS])
def test_every_config_key_is_in_the_reference_with_its_default(section, key, default):
    rows = _doc_rows((DOCS / "configuration.md").read_text(encoding="utf-8"))
    assert (section, key) in rows, (
        f"[{section}] {key} is a config key (adapter/config.py) but docs/configuration.md has no row for it: "
        f"add a row `| \\`{key}\\` | type | \\`default\\` | what it does | example |` under its `[{section}]` heading")
    cells = rows[(section, key)]
    assert len(cells) >= 3 and cells[2] == f"`{_toml_literal(default)}`", (
        f"docs/configuration.md shows the default of [{section}] {key} as {cells[2:3]}; "
        f"the code's default is `{_toml_literal(default)}`")


def _example_sections() -> dict[str, dict[str, str]]:
    """config/adapter.example.toml: section -> key -> the line (commented-out keys included)."""
    found: dict[str, dict[str, str]] = {}
    section = ""
    for line in (ROOT / "config" / "adapter.example.toml").read_text(encoding="utf-8").splitlines():
        header = re.match(r"^\s*#?\s*(?P<brackets>\[\[?)(?P<name>[\w.]+)\]", line)
        if header and (header["brackets"] == "[[" or not line.lstrip().startswith("#")):
            section = header["name"]
            found.setdefault(section, {})
            parent, _, table = section.rpartition(".")
            if parent:  # [serve.x] or [[serve.x]] shows the key x of [serve]
                found.setdefault(parent, {}).setdefault(table, line)
            continue
        # A key may be shown commented out, or as an alternative in a comment ("# or password_file = …").
        for key in re.findall(r"(?:^|[#\s])(\w+)\s*=", line) if section else ():
            found[section].setdefault(key, line)
    return found


# Keys whose example value is a site's own setting, not the default.
EXAMPLE_NOT_DEFAULT = {("fhir", "base_url")}


@pytest.mark.parametrize("section,key,default", CONFIG_KEYS, ids=[f"{s}.{k}" for s, k, _ in CONFIG_KEYS])
def test_every_config_key_is_in_the_example_config(section, key, default):
    line = _example_sections().get(section, {}).get(key)
    assert line is not None, (
        f"[{section}] {key} is a config key (adapter/config.py) but config/adapter.example.toml does not show "
        f"it: add it under [{section}] with its default and a comment")
    if not re.match(rf"^\s*{key}\s*=", line) or (section, key) in EXAMPLE_NOT_DEFAULT:
        return  # shown as an example (secrets by reference), not as the default
    shown = tomllib.loads(line.strip())[key]  # TOML allows the trailing comment
    expected = list(default) if isinstance(default, tuple) else default
    assert shown == expected, (
        f"config/adapter.example.toml shows [{section}] {key} = {shown!r}, the default is {expected!r}")


def _environment_variables() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "adapter").rglob("*.py"):
        names |= set(re.findall(r"\bANC_[A-Z0-9_]+\b", path.read_text(encoding="utf-8")))
    return names


def test_every_environment_variable_is_documented():
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    names = _environment_variables()
    assert "ANC_ADAPTER_CONFIG" in names  # the scan itself works
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"environment variables read by adapter/ but not in docs/configuration.md: {missing}"


# -- other references --------------------------------------------------------------------------------

def test_every_quarantine_reason_is_documented():
    text = (DOCS / "what-we-read-and-write.md").read_text(encoding="utf-8")
    missing = [r.value for r in Reason if f"`{r.value}`" not in text]
    assert not missing, f"model.Reason values missing from docs/what-we-read-and-write.md: {missing}"


def test_every_exit_code_has_a_runbook_entry():
    text = (DOCS / "operations.md").read_text(encoding="utf-8")
    rows = {int(m[1]) for m in re.finditer(r"^\| (\d) \|", text, re.MULTILINE)}
    missing = sorted(int(code) for code in ExitCode if int(code) not in rows)
    assert not missing, f"exit codes without a row in docs/operations.md: {missing}"


def test_every_shipped_code_is_in_the_clinical_rules():
    text = (DOCS / "clinical-rules.md").read_text(encoding="utf-8")
    shipped = mappings_module.load()
    codes = {code for _, code in shipped.anc_codes} | {code for _, code in shipped.input_kinds()}
    missing = sorted(c for c in codes if c not in text)
    assert not missing, f"LOINC codes in mappings/loinc.toml but not in docs/clinical-rules.md: {missing}"


def test_relative_links_in_the_docs_resolve():
    broken = []
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not re.match(r"^[a-z]+:", target) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, f"links to files that do not exist: {broken}"


def test_the_project_does_not_point_outside_itself():
    """Users clone this repository alone: nothing may send them to a sibling folder they do not have."""
    offenders = []
    for folder in ("adapter", "mappings", "config", "docs", "bench"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".toml", ".md", ".yaml", ".service", ".timer", ".json"):
                if re.search(r"\.\./shared|/work/shared", path.read_text(encoding="utf-8")):
                    offenders.append(str(path.relative_to(ROOT)))
    if re.search(r"\.\./shared|/work/shared", (ROOT / "README.md").read_text(encoding="utf-8")):
        offenders.append("README.md")
    assert not offenders, f"files referring to a folder outside the repository: {offenders}"


# -- examples produced by the code -------------------------------------------------------------------
#
# Each scenario is served to `anc-adapter run` (the real command, end to end) by a mocked FHIR server;
# the examples are the search pages it read and the transactions it posted. A scenario with several
# pages runs once per page on the same state, as successive cron runs would.

BASE = "https://fhir.hospital.example/r4"
CAPABILITY = {
    "resourceType": "CapabilityStatement", "fhirVersion": "4.0.1",
    "rest": [{"mode": "server", "interaction": [{"code": "transaction"}], "resource": [
        {"type": kind, "conditionalUpdate": True, "searchParam": [{"name": "identifier"}]}
        for kind in ("Flag", "RiskAssessment")
    ]}],
}
CONFIG = """
[output]
resources = ["Flag", "RiskAssessment"]
provenance = true
"""


def _patient(patient_id: str, birth_date: str | None) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Patient", "id": patient_id}
    if birth_date:
        resource["birthDate"] = birth_date
    return resource


def _anc(observation_id: str, patient_id: str, value: float, unit: str, effective: str, *, ucum: bool = True,
         status: str = "final", version: str = "1", comparator: str = "",
         low: dict[str, Any] | None = None) -> dict[str, Any]:
    quantity: dict[str, Any] = {"value": value, "unit": unit}
    if comparator:
        quantity["comparator"] = comparator
    if ucum:
        quantity.update(system=UCUM, code=unit)
    resource: dict[str, Any] = {
        "resourceType": "Observation", "id": observation_id,
        "meta": {"versionId": version, "lastUpdated": effective.replace("Z", ".000Z")},
        "status": status,
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "laboratory"}]}],
        "code": {"coding": [{"system": LOINC, "code": "751-8",
                             "display": "Neutrophils [#/volume] in Blood by Automated count"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": effective,
        "valueQuantity": quantity,
    }
    if low:
        resource["referenceRange"] = [{"low": low}]
    return resource


def _page(*resources: dict[str, Any]) -> dict[str, Any]:
    """A search page as the server returns it: the Observations, and their Patients _included."""
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": r, "search": {"mode": "include" if r["resourceType"] == "Patient" else "match"}}
                      for r in resources]}


def _run(pages: list[dict[str, Any]], config_text: str = CONFIG) -> list[dict[str, Any]]:
    """`anc-adapter run` once per page on one state file; the transaction Bundles it posted, per run."""
    import responses

    from adapter.cli import main

    posted: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="anc-docs-") as workdir:
        config_path = Path(workdir, "adapter.toml")
        config_path.write_text(config_text, encoding="utf-8")
        ids: dict[str, str] = {}

        def accept(request: Any) -> tuple[int, dict[str, str], str]:
            bundle = json.loads(request.body)
            posted.append(bundle)
            answers = []
            for entry in bundle["entry"]:
                url = entry["request"]["url"]
                kind = entry["resource"]["resourceType"]
                # A PUT by id keeps its id; a conditional PUT gets one id per identifier, kept across runs.
                count = sum(1 for known in ids.values() if known.startswith(f"{kind.lower()}-"))
                assigned = f"{kind.lower()}-{count + 1}" if "?" in url else url.split("/", 1)[1]
                server_id = ids.setdefault(url, assigned)
                answers.append({"response": {"status": "201 Created", "location": f"{kind}/{server_id}/_history/1"}})
            return 200, {}, json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": answers})

        for search_page in pages:
            with responses.RequestsMock(assert_all_requests_are_fired=False) as server:
                server.get(f"{BASE}/metadata", json=CAPABILITY)
                server.get(re.compile(rf"{re.escape(BASE)}/Flag\b.*"),  # no Flags of ours on the server yet
                           json={"resourceType": "Bundle", "type": "searchset", "entry": []})
                server.get(f"{BASE}/Observation", json=search_page)
                server.add_callback(responses.POST, BASE, callback=accept)
                code = main(["run", "--config", str(config_path), "--fhir-url", BASE,
                             "--state", str(Path(workdir, "state.sqlite3")), "--log-format", "json",
                             "--log-level", "WARNING"])
                assert code == 0, f"anc-adapter run exited {code}"
    return posted


def _resources(bundle: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == resource_type]


def _one(bundle: dict[str, Any], resource_type: str) -> dict[str, Any]:
    found = _resources(bundle, resource_type)
    assert len(found) == 1, (resource_type, found)
    return found[0]


def _fixed_clock(bundle: dict[str, Any]) -> dict[str, Any]:
    """The Provenance's `recorded` is the wall-clock time of the write: fixed in the examples."""
    for provenance in _resources(bundle, "Provenance"):
        assert datetime.fromisoformat(provenance["recorded"].replace("Z", "+00:00")).tzinfo is not None
        provenance["recorded"] = RECORDED
    return bundle


@functools.lru_cache(maxsize=1)
def examples() -> dict[str, Any]:
    """docs/examples/<name>.json -> content: what `anc-adapter run` read and wrote in each scenario."""
    out: dict[str, Any] = {}

    # 1. An adult with a severe count (SI units): an active Flag, a RiskAssessment, and the transaction
    #    that carries them with a Provenance each.
    adult = _patient("example-adult", "1961-04-12")
    out["input-severe"] = _page(_anc("example-anc-1", "example-adult", 0.32, "10*9/L", "2026-11-20T08:15:00Z"),
                                adult)
    [bundle] = _run([out["input-severe"]])
    out["transaction-severe"] = _fixed_clock(bundle)
    out["flag-severe-active"] = _one(bundle, "Flag")
    out["riskassessment-severe"] = _one(bundle, "RiskAssessment")
    out["provenance-flag"] = _resources(bundle, "Provenance")[0]
    assert out["provenance-flag"]["target"][0]["reference"] == bundle["entry"][0]["fullUrl"]

    # 2. A child (adult thresholds from 1 year): moderate, then mild (a lab alias unit), then normal. The
    #    Flag shows the latest abnormal grade and is inactive, its period ending at the normal count.
    child = _patient("example-child", "2019-06-01")
    out["input-episode-closed"] = _page(
        _anc("example-anc-2", "example-child", 800, "/uL", "2026-11-02T07:30:00Z"),
        _anc("example-anc-3", "example-child", 1.2, "K/uL", "2026-11-05T07:40:00Z", ucum=False),
        _anc("example-anc-4", "example-child", 2.1, "10*3/uL", "2026-11-09T08:05:00Z"),
        child)
    [bundle] = _run([out["input-episode-closed"]])
    out["flag-episode-closed"] = _one(bundle, "Flag")

    # 3. The count behind a live Flag is set to entered-in-error (a second run reads the new version):
    #    the Flag and the RiskAssessment are withdrawn.
    patient = _patient("example-withdrawn", "1975-09-30")
    first = _anc("example-anc-5", "example-withdrawn", 450, "/uL", "2026-11-18T09:00:00Z")
    withdrawn = {**first, "status": "entered-in-error",
                 "meta": {"versionId": "2", "lastUpdated": "2026-11-18T11:42:00.000Z"}}
    out["input-withdrawn"] = _page(withdrawn, patient)
    _, bundle = _run([_page(first, patient), out["input-withdrawn"]])
    out["flag-withdrawn"] = _one(bundle, "Flag")
    out["riskassessment-withdrawn"] = _one(bundle, "RiskAssessment")

    # 4. CTCAE v5 profile: 1700 cells/µL under a reference range whose low end is 1800: grade 1.
    trial = _patient("example-ctcae", "1983-02-14")
    out["input-ctcae"] = _page(
        _anc("example-anc-6", "example-ctcae", 1.7, "10*3/uL", "2026-11-21T08:00:00Z",
             low={"value": 1.8, "unit": "10*3/uL", "system": UCUM, "code": "10*3/uL"}),
        trial)
    [bundle] = _run([out["input-ctcae"]], CONFIG + '\n[classify]\nprofile = "ctcae-v5"\n')
    out["flag-ctcae-grade-1"] = _one(bundle, "Flag")
    out["riskassessment-ctcae-grade-1"] = _one(bundle, "RiskAssessment")

    # 5. A comparator and no birthDate: "<1000" is at least moderate; adult thresholds, said in the text.
    out["input-at-least"] = _page(
        _anc("example-anc-7", "example-no-birthdate", 1000, "/uL", "2026-11-22T06:50:00Z", comparator="<"),
        _patient("example-no-birthdate", None))
    [bundle] = _run([out["input-at-least"]])
    out["flag-at-least-age-unknown"] = _one(bundle, "Flag")
    return out


def _render(content: Any) -> str:
    return json.dumps(content, indent=2, ensure_ascii=False) + "\n"


def test_examples_are_what_the_code_writes():
    generated = {f"{name}.json": _render(content) for name, content in examples().items()}
    if os.environ.get("ANC_REGENERATE_DOCS") == "1":
        EXAMPLES.mkdir(parents=True, exist_ok=True)
        for stale in EXAMPLES.glob("*.json"):
            if stale.name not in generated:
                stale.unlink()
        for name, text in generated.items():
            (EXAMPLES / name).write_text(text, encoding="utf-8")
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in EXAMPLES.glob("*.json")}
    stale = sorted(set(on_disk) - set(generated))
    different = sorted(name for name, text in generated.items() if on_disk.get(name) != text)
    assert not different and not stale, (
        f"docs/examples/ no longer matches what the adapter writes (changed or missing: {different}; "
        f"no longer produced: {stale}). Regenerate with\n    {REGENERATE}\nthen review the diff and commit it.")


def test_every_example_is_linked_from_the_docs():
    text = "".join(p.read_text(encoding="utf-8") for p in DOCS.glob("*.md"))
    unlinked = sorted(f"{name}.json" for name in examples() if f"examples/{name}.json" not in text)
    assert not unlinked, f"docs/examples files not linked from any docs/*.md page: {unlinked}"


def test_every_example_resource_is_valid_fhir_r4():
    """Examples are what we send: each one validates with the R4B model, as writeback requires."""
    from fhir.resources.R4B import get_fhir_model_class

    for name, content in examples().items():
        if name.startswith("input-"):
            continue
        get_fhir_model_class(content["resourceType"]).model_validate(content)
