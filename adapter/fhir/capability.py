"""`anc-adapter check`: can this adapter do its job against this server? A checklist a person can read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapter.config import Config
from adapter.errors import AdapterError, AuthError, ConfigError, ExitCode
from adapter.fhir.client import FhirClient


@dataclass
class Report:
    items: list[tuple[bool, str]] = field(default_factory=list)
    exit_code: ExitCode = ExitCode.OK

    def add(self, ok: bool, text: str) -> None:
        self.items.append((ok, text))
        if not ok and self.exit_code == ExitCode.OK:
            self.exit_code = ExitCode.CONFIG

    def render(self) -> str:
        lines = [f"[{'ok' if ok else 'FAIL'}] {text}" for ok, text in self.items]
        verdict = "ready" if self.exit_code == ExitCode.OK else f"NOT ready (exit {int(self.exit_code)})"
        return "\n".join(lines + [verdict]) + "\n"


def check(client: FhirClient, config: Config) -> Report:
    report = Report()
    report.add(True, f"config valid; server {client.base_url}; auth {config.auth.type}")
    try:
        statement = client.get("metadata")
    except ConfigError:
        raise  # e.g. token endpoint discovery failed: fix auth.token_url (exit 2)
    except AuthError as exc:
        report.add(False, f"authentication: {exc}")
        report.exit_code = ExitCode.AUTH
        return report
    except AdapterError as exc:
        report.add(False, f"server reachable: {exc}")
        report.exit_code = ExitCode.UNREACHABLE
        return report
    if statement.get("resourceType") != "CapabilityStatement":
        report.add(False, "/metadata did not return a CapabilityStatement")
        return report
    report.add(True, f"/metadata read (FHIR {statement.get('fhirVersion', '?')})")
    try:
        client.get("Observation", params={"_count": 1, "code": "http://loinc.org|751-8"})
        report.add(True, "authenticated search: Observation?code=…")
    except AuthError as exc:
        report.add(False, f"authentication: {exc}")
        report.exit_code = ExitCode.AUTH
        return report
    except AdapterError as exc:
        report.add(False, f"search Observation: {exc}")
    for ok, text in interactions(statement, config):
        report.add(ok, text)
    for ok, text in context_searches(statement, config):
        report.add(ok, text)
    return report


def context_searches(statement: dict[str, Any], config: Config) -> list[tuple[bool, str]]:
    """Clinical context (CONTRACT §5b): `run` sends a context search only when the server declares every
    parameter it uses, and writes the alert without that context otherwise — never a failure."""
    from adapter import context_source

    lines = []
    for kind, params, around, poll in context_source.coverage(context_source.searchable(statement),
                                                               config.context):
        if around and poll:
            lines.append((True, f"context: search {kind} by {', '.join(params)}"))
        else:
            missing = " and ".join(what for what, sent in (("around new counts", around),
                                                           ("for late changes", poll)) if not sent)
            lines.append((True, f"context: {kind} is not read {missing}: the CapabilityStatement does not "
                                f"declare the search parameters (the alert is written without it)"))
    return lines


CONDITIONAL = "conditional"  # PUT [type]?identifier=system|value: the server finds or creates it
CLIENT_ID = "client-id"  # PUT [type]/[id derived from our identifier]: update-as-create


def _server_rest(statement: dict[str, Any]) -> dict[str, Any]:
    """The CapabilityStatement's rest entry for the server; {} when missing or malformed."""
    rests = statement.get("rest") if isinstance(statement.get("rest"), list) else []
    return next((r for r in rests if isinstance(r, dict) and r.get("mode") == "server"), {})


def _resources(rest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    entries = rest.get("resource") if isinstance(rest.get("resource"), list) else []
    return {r.get("type"): r for r in entries if isinstance(r, dict)}


def _codes(items: Any, key: str = "code") -> set[Any]:
    return {i.get(key) for i in items if isinstance(i, dict)} if isinstance(items, list) else set()


def write_modes(statement: dict[str, Any], resource_types: tuple[str, ...]) -> dict[str, str]:
    """How to make each write idempotent on this server. Conditional update by identifier where the
    server says it can; otherwise a deterministic id of ours (Sekmet 0.1.1, for one, has no `identifier`
    search parameter for RiskAssessment, so a conditional update on it fails)."""
    resources = _resources(_server_rest(statement))
    modes = {}
    for kind in resource_types:
        entry = resources.get(kind, {})
        names = _codes(entry.get("searchParam"), "name")
        modes[kind] = CONDITIONAL if entry.get("conditionalUpdate") and "identifier" in names else CLIENT_ID
    return modes


def bundle_type(statement: dict[str, Any]) -> str:
    """A transaction when the server offers one (all or nothing per page), else a batch."""
    system = _codes(_server_rest(statement).get("interaction"))
    return "batch" if "batch" in system and "transaction" not in system else "transaction"


def interactions(statement: dict[str, Any], config: Config) -> list[tuple[bool, str]]:
    rest = _server_rest(statement)
    resources = _resources(rest)
    system = _codes(rest.get("interaction"))

    def supports(kind: str, interaction: str) -> bool:
        return interaction in _codes(resources.get(kind, {}).get("interaction"))

    def params(kind: str) -> set[str]:
        return _codes(resources.get(kind, {}).get("searchParam"), "name")

    observation_params = params("Observation")

    def param(name: str, standard: bool) -> tuple[bool, str]:
        if name in observation_params:
            return True, f"search Observation by {name}"
        if standard:  # _lastUpdated is defined for every resource; many servers do not list it
            return True, f"search Observation by {name} (standard parameter, not declared)"
        return False, f"search Observation by {name}: not in the CapabilityStatement"

    results = [
        (supports("Observation", "search-type"), "search Observation"),
        param("code", standard=False),
        param("_lastUpdated", standard=True),
        (supports("Patient", "read"), "read Patient"),
        ("transaction" in system or "batch" in system,
         f"write bundles: {bundle_type(statement)}" if "transaction" in system or "batch" in system
         else "write bundles: neither transaction nor batch"),
    ]
    modes = write_modes(statement, config.output.resources)
    for kind in config.output.resources:
        listed = kind in resources
        if modes[kind] == CONDITIONAL:
            results.append((True, f"write {kind}: conditional update by identifier"))
        elif not listed or resources[kind].get("updateCreate"):
            results.append((True, f"write {kind}: update-as-create with ids derived from our identifiers"
                                  + ("" if listed else f" ({kind} is not in the CapabilityStatement)")))
        else:
            results.append((False, f"write {kind}: neither conditional update by identifier nor updateCreate"))
    return results
