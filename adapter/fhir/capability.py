"""`anc-adapter check`: can this adapter do its job against this server? A checklist a person can read.

`check` and `run` agree: `[FAIL]` only for what will make `run` fail; what the server's CapabilityStatement
does not declare but `run` will still try is `[warn]`, saying what `run` will do and what happens if the
server refuses it. Many servers under-declare (Sekmet lists no RiskAssessment at all, yet writes it), so an
undeclared interaction is no reason to stop a deployment; a declared refusal, or a live request that
fails, is."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from adapter import source
from adapter.config import Config
from adapter.errors import AdapterError, AuthError, ConfigError, ExitCode, TransientHttpError
from adapter.fhir.client import FhirClient
from adapter.mappings import Coding

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass
class Report:
    items: list[tuple[str, str]] = field(default_factory=list)  # (OK | WARN | FAIL, text)
    exit_code: ExitCode = ExitCode.OK

    def add(self, level: str, text: str, exit_code: ExitCode = ExitCode.CONFIG) -> None:
        self.items.append((level, text))
        if level == FAIL and self.exit_code == ExitCode.OK:
            self.exit_code = exit_code

    def render(self) -> str:
        lines = [f"[{level}] {text}" for level, text in self.items]
        if self.exit_code != ExitCode.OK:
            verdict = f"NOT ready (exit {int(self.exit_code)})"
        elif any(level == WARN for level, _ in self.items):
            verdict = "ready, with warnings"
        else:
            verdict = "ready"
        return "\n".join(lines + [verdict]) + "\n"


def check(client: FhirClient, config: Config, codes: tuple[Coding, ...]) -> Report:
    """`codes`: what run searches for (the ANC codes, plus the derivation inputs when classify.derive)."""
    report = Report()
    report.add(OK, f"config valid; server {client.base_url}; auth {config.auth.type}")
    try:
        statement = client.get("metadata")
    except ConfigError:
        raise  # e.g. token endpoint discovery failed: fix auth.token_url (exit 2)
    except AuthError as exc:
        report.add(FAIL, f"authentication: {exc}", ExitCode.AUTH)
        return report
    except AdapterError as exc:
        report.add(FAIL, f"server reachable: {exc}", ExitCode.UNREACHABLE)
        return report
    if statement.get("resourceType") != "CapabilityStatement":
        # run finds no declarations in it either and goes on the undeclared way; the live search below
        # tells whether fhir.base_url is a FHIR server at all.
        report.add(WARN, f"/metadata answered a {statement.get('resourceType')!r}, not a CapabilityStatement; "
                         "run declares nothing from it and writes the undeclared way (below) — is "
                         "fhir.base_url the FHIR base?")
        statement = {}
    else:
        report.add(OK, f"/metadata read (FHIR {statement.get('fhirVersion', '?')})")
    # The very query run sends on its first pass (one entry): a server that refuses a parameter, _include
    # or _sort fails here exactly as run would.
    since = datetime.now(timezone.utc) - config.poll.lookback
    try:
        bundle = client.get("Observation", params=source.search_params(codes, since, None, 1))
        if bundle.get("resourceType") != "Bundle":
            report.add(FAIL, f"search Observation: answered a {bundle.get('resourceType')!r}, not a Bundle; "
                             "run would stop with exit 3")
        else:
            report.add(OK, "authenticated search: Observation?code=…&_lastUpdated=…&_include=…&_sort=… "
                           "(the query run sends)")
    except AuthError as exc:
        report.add(FAIL, f"authentication: {exc}", ExitCode.AUTH)
        return report
    except AdapterError as exc:
        code = ExitCode.UNREACHABLE if isinstance(exc, TransientHttpError) else ExitCode.CONFIG
        report.add(FAIL, f"search Observation: {exc}; run would stop with exit 3", code)
    for level, text in interactions(statement, config):
        report.add(level, text)
    for level, text in context_searches(statement, config):
        report.add(level, text)
    return report


def context_searches(statement: dict[str, Any], config: Config) -> list[tuple[str, str]]:
    """Clinical context (CONTRACT §5b): `run` sends a context search only when the server declares every
    parameter it uses, and writes the alert without that context otherwise: a warning, never a failure."""
    from adapter import context_source

    lines = []
    for kind, params, around, poll in context_source.coverage(context_source.searchable(statement),
                                                               config.context):
        if around and poll:
            lines.append((OK, f"context: search {kind} by {', '.join(params)}"))
        else:
            missing = " and ".join(what for what, sent in (("around new counts", around),
                                                           ("for late changes", poll)) if not sent)
            lines.append((WARN, f"context: {kind} is not read {missing}: the CapabilityStatement does not "
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


def declares_batch(statement: dict[str, Any]) -> bool:
    """Does the server take batches? Then a group's context searches go in one (context_source)."""
    return "batch" in _codes(_server_rest(statement).get("interaction"))


def interactions(statement: dict[str, Any], config: Config) -> list[tuple[str, str]]:
    """What the CapabilityStatement says about each thing run does: (OK | WARN | FAIL, text)."""
    rest = _server_rest(statement)
    resources = _resources(rest)
    system = _codes(rest.get("interaction"))

    def declared(kind: str, interaction: str) -> bool:
        return interaction in _codes(resources.get(kind, {}).get("interaction"))

    observation_params = _codes(resources.get("Observation", {}).get("searchParam"), "name")
    results = [
        (OK, "search Observation") if declared("Observation", "search-type") else
        (WARN, "search Observation: not declared; run searches anyway (the search above shows whether the "
               "server answers) — if the server refuses, run exits 3 and the watermark stays"),
        (OK, "search Observation by code") if "code" in observation_params else
        (WARN, "search Observation by code: not declared; run searches by code anyway — if the server "
               "ignores the parameter, run reads every Observation in the window and keeps only the codes "
               "in its mappings (slower, nothing missed)"),
        (OK, "search Observation by _lastUpdated") if "_lastUpdated" in observation_params else
        (WARN, "search Observation by _lastUpdated: not declared (a standard parameter many servers do not "
               "list); run searches by it anyway — if the server ignores it, every run reads all ANC "
               "Observations again (slower; versions already processed are skipped, nothing is written "
               "twice)"),
        (OK, "read Patient") if declared("Patient", "read") else
        (WARN, "read Patient: not declared; run reads Patient/<id> only for patients the search did not "
               "_include — if the server refuses such a read, run exits 3 and the next run tries again"),
    ]
    results.append(_bundles(system, config))
    modes = write_modes(statement, config.output.resources)
    for kind in config.output.resources:
        results.append(_write(kind, modes[kind], resources))
    if config.output.provenance:
        results.append(_write("Provenance", CLIENT_ID, resources))
    return results


def _bundles(system: set[Any], config: Config) -> tuple[str, str]:
    if "transaction" in system:
        return OK, "write bundles: transaction"
    if "batch" in system:
        if config.output.provenance:
            # run refuses this with a ConfigError: a Provenance must name the resource it is about, and
            # inside a batch a new resource's id is unknown.
            return FAIL, ("write bundles: the server declares batch but not transaction, and "
                          "output.provenance = true needs transactions; run stops with exit 2 — set "
                          "output.provenance = false, or enable transactions on the server")
        return OK, "write bundles: batch"
    return WARN, ("write bundles: the server declares neither transaction nor batch; run will POST a "
                  "transaction bundle — if the server refuses it, nothing is committed, run exits 3 and the "
                  "next run sends the same writes again")


def _write(kind: str, mode: str, resources: dict[str, dict[str, Any]]) -> tuple[str, str]:
    if mode == CONDITIONAL:
        return OK, f"write {kind}: conditional update by identifier"
    entry = resources.get(kind)
    if entry is not None and entry.get("updateCreate") is True:
        return OK, f"write {kind}: update-as-create with ids derived from our identifiers"
    put = f"run will PUT {kind}/<id derived from our identifier>"
    if entry is not None and (entry.get("updateCreate") is False
                              or ("interaction" in entry and "update" not in _codes(entry.get("interaction")))):
        # The server says, in so many words, that it refuses the only write left to us: every patient's
        # writes would be refused on every run and no alert would ever reach the chart.
        said = "updateCreate false" if entry.get("updateCreate") is False else "no update interaction"
        return FAIL, (f"write {kind}: the server declares {said} and no conditional update by identifier; "
                      f"{put}, which it says it refuses (run would exit 3 on every run) — enable "
                      f"update-as-create, or conditional update with the identifier search parameter, for "
                      f"{kind}")
    what = (f"{kind} is not in the CapabilityStatement" if entry is None else
            "the server declares neither conditional update by identifier nor updateCreate")
    return WARN, (f"write {kind}: {what}; {put} — if the server refuses, the patient's writes are kept in "
                  f"state and retried every run, and run exits 3")
