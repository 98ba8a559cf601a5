"""Environment proxies ($HTTP_PROXY, $HTTPS_PROXY, $NO_PROXY), as cron jobs behind a hospital's egress proxy
get them: `anc-adapter run` as a subprocess with an explicit environment, through a forward proxy
(tests/forwardproxy.py) before the real local FHIR server. HTTPS goes through a CONNECT tunnel to the TLS
front, and is still verified against the configured CA: the proxy only passes bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import certifi
import pytest

from builders import anc, patient
from forwardproxy import ForwardProxy
from fronts import Front, tls_context
from pki import make_pki
from tokenserver import TokenServer

pytestmark = pytest.mark.integration
# requests reads these in either case; none may leak in from the machine running the tests.
_PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "requests_ca_bundle", "curl_ca_bundle"}


@pytest.fixture
def loaded(fhir_server):
    fhir_server.load(patient("p1"), anc("o1", "p1", 0.4), patient("p2"), anc("o2", "p2", 0.8))
    return fhir_server


@pytest.fixture
def proxy():
    with ForwardProxy() as running:
        yield running


def run(tmp_path, base_url: str, env: dict[str, str], **sections: dict[str, object]) -> subprocess.CompletedProcess:
    lines = ["[fhir]", f"base_url = {json.dumps(base_url)}", "retries = 1", "retry_budget_s = 2"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in sections.pop("fhir", {}).items()]
    for name, keys in sections.items():
        lines += [f"[{name}]"] + [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    config = tmp_path / "adapter.toml"
    config.write_text("\n".join(lines) + "\n")
    clean = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARIABLES}
    return subprocess.run([sys.executable, "-m", "adapter", "run", "--config", str(config),
                           "--state", str(tmp_path / "state.sqlite3"), "--log-format", "json"],
                          env={**clean, **env}, capture_output=True, text=True, timeout=120)


def flagged(server) -> set[str]:
    return {f["subject"]["reference"] for f in server.flags() if f["status"] == "active"}


def test_http_goes_through_the_proxy(loaded, tmp_path, proxy):
    done = run(tmp_path, loaded.base_url, {"HTTP_PROXY": proxy.url})
    assert done.returncode == 0, done.stderr[-2000:]
    assert flagged(loaded) == {"Patient/p1", "Patient/p2"}
    methods = {method for method, _ in proxy.forwarded}
    assert {"GET", "POST"} <= methods  # the reads and the write bundle
    assert (("GET", f"{loaded.base_url}/metadata") in proxy.forwarded)
    assert all(uri.startswith(loaded.base_url) for _, uri in proxy.forwarded)
    assert proxy.refused == [] and proxy.tunnels == []


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost,127.0.0.1", "*"])
def test_no_proxy_covering_the_server_bypasses_it(loaded, tmp_path, proxy, no_proxy):
    done = run(tmp_path, loaded.base_url, {"HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url,
                                           "NO_PROXY": no_proxy})
    assert done.returncode == 0, done.stderr[-2000:]
    assert flagged(loaded) == {"Patient/p1", "Patient/p2"}
    assert proxy.seen == 0


def test_https_goes_through_a_connect_tunnel_and_is_verified_with_the_configured_ca(loaded, tmp_path, proxy):
    pki = make_pki(tmp_path / "pki")
    with Front(loaded.base_url, tls=tls_context(pki.server_cert, pki.server_key)) as front:
        env = {"HTTPS_PROXY": proxy.url, "REQUESTS_CA_BUNDLE": certifi.where()}  # must not win over verify
        done = run(tmp_path, front.base_url, env, fhir={"verify": str(pki.ca_file)})
        assert done.returncode == 0, done.stderr[-2000:]
        origin = front.base_url.removeprefix("https://").split("/")[0]
        assert proxy.tunnels and set(proxy.tunnels) == {origin}
        assert proxy.forwarded == [] and proxy.tunnelled_bytes > 0
        assert any(path.startswith("/fhir/metadata") for path in front.paths)
        assert flagged(loaded) == {"Patient/p1", "Patient/p2"}

        # The proxy does not terminate TLS: with the system store, which does not know our CA, the
        # certificate the front shows through the tunnel is refused.
        (tmp_path / "state.sqlite3").unlink()
        refused = run(tmp_path, front.base_url, env)
        assert refused.returncode == 3
        assert front.handshake_failures >= 1


def test_the_token_endpoint_goes_through_the_proxy_too(loaded, tmp_path, proxy):
    with TokenServer(lifetime_s=120) as tokens:
        tokens.register_secret("anc-adapter", "cs-3d9e7a1f5b2c")
        (tmp_path / "secret").write_text("cs-3d9e7a1f5b2c")
        with Front(loaded.base_url, gate=tokens.check_bearer) as front:
            auth = {"type": "client_credentials", "client_id": "anc-adapter", "token_url": tokens.url,
                    "client_secret_file": str(tmp_path / "secret")}
            done = run(tmp_path, front.base_url, {"HTTP_PROXY": proxy.url}, auth=auth)
        assert done.returncode == 0, done.stderr[-2000:]
    assert ("POST", tokens.url) in proxy.forwarded
    assert any(uri.startswith(front.base_url) for _, uri in proxy.forwarded)
    assert flagged(loaded) == {"Patient/p1", "Patient/p2"}
