"""`check` and `run` agree (CONTRACT §1), on the real server behind a front that serves another
CapabilityStatement: what check calls a warning, run gets through; what check calls a failure, run fails."""

from __future__ import annotations

import json

import pytest
import requests

from adapter.cli import main
from adapter.writeback import stable_id
from builders import anc, patient
from fronts import Front

pytestmark = pytest.mark.integration
SYSTEM_BASE = "https://hospital.example/fhir/anc-adapter"  # the default [output] system_base


def statement(server, system_interactions: list[str] | None) -> dict:
    """Sekmet's own CapabilityStatement with every updateCreate and conditionalUpdate left out and the
    system interactions replaced: a server that under-declares, as many do."""
    stripped = requests.get(f"{server.base_url}/metadata", timeout=30).json()
    for rest in stripped["rest"]:
        for entry in rest["resource"]:
            entry.pop("updateCreate", None)
            entry.pop("conditionalUpdate", None)
        rest.pop("interaction", None)
        if system_interactions is not None:
            rest["interaction"] = [{"code": code} for code in system_interactions]
    return stripped


def commands(tmp_path, base_url: str, config: str = "") -> tuple[list[str], list[str]]:
    path = tmp_path / "adapter.toml"
    path.write_text(config)
    common = ["--config", str(path), "--fhir-url", base_url, "--log-format", "json"]
    return ["check", *common], ["run", *common, "--state", str(tmp_path / "state.sqlite3")]


def test_an_under_declaring_server_warns_in_check_and_run_writes_the_flags(fhir_server, tmp_path, capsys):
    fhir_server.load(patient("p1"), anc("o1", "p1", 0.4), patient("p2"), anc("o2", "p2", 0.8))
    documents = {"/fhir/metadata": statement(fhir_server, None)}
    with Front(fhir_server.base_url, documents=documents) as front:
        check, run = commands(tmp_path, front.base_url)
        assert main(check) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[-1] == "ready, with warnings" and not any(line.startswith("[FAIL]") for line in out)
        assert any(line.startswith("[warn] write Flag: the server declares neither") for line in out)
        assert any(line.startswith("[warn] write bundles: the server declares neither") for line in out)
        assert main(run) == 0
    flags = {f["subject"]["reference"]: f for f in fhir_server.flags()}
    assert set(flags) == {"Patient/p1", "Patient/p2"}
    for reference, flag in flags.items():
        # Written the way check announced: PUT Flag/<id derived from our identifier>.
        identifier = flag["identifier"][0]["value"]
        assert flag["id"] == stable_id(f"{SYSTEM_BASE}/Flag", identifier)


def test_provenance_on_a_batch_only_server_fails_in_check_and_in_run(fhir_server, tmp_path, capsys):
    fhir_server.load(patient("p1"), anc("o1", "p1", 0.4))
    documents = {"/fhir/metadata": statement(fhir_server, ["batch"])}
    with Front(fhir_server.base_url, documents=documents) as front:
        check, run = commands(tmp_path, front.base_url, "[output]\nprovenance = true\n")
        assert main(check) == 2
        out = capsys.readouterr().out.splitlines()
        assert out[-1] == "NOT ready (exit 2)"
        assert any(line.startswith("[FAIL] write bundles: the server declares batch but not transaction")
                   for line in out)
        assert main(run) == 2
        assert "output.provenance" in json.loads(capsys.readouterr().err.splitlines()[-1])["msg"]
    assert fhir_server.flags() == []
