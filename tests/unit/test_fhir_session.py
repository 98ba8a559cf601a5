"""The configured Session works out the environment's settings for a server once, and gives what requests'
own merge gives, for every server, proxy variable and argument (ConfiguredSession)."""

from __future__ import annotations

import pytest
import requests

from adapter.fhir.client import session

URLS = ["http://fhir.example/r4/Observation?code=1", "https://fhir.example/r4/metadata",
        "https://fhir.example:8443/r4/Flag", "http://127.0.0.1:8080/fhir", "https://other.example/token",
        "https://sub.internal.example/fhir"]
ENVIRONMENTS = [
    {},
    {"HTTPS_PROXY": "http://proxy.example:3128", "HTTP_PROXY": "http://proxy.example:3128"},
    {"https_proxy": "http://lower.example:3128", "NO_PROXY": "fhir.example,127.0.0.1"},
    {"HTTPS_PROXY": "http://proxy.example:3128", "no_proxy": ".internal.example,fhir.example:8443"},
    {"ALL_PROXY": "socks5://proxy.example:1080", "NO_PROXY": "*"},
    {"HTTPS_PROXY": "http://proxy.example:3128", "REQUESTS_CA_BUNDLE": "/somewhere/ca.pem"},
]


def plain_merge(verify, cert, url, proxies, stream, call_verify):
    """What requests' Session merges, with verify kept as configured (ConfiguredSession's one change)."""
    http = requests.Session()
    http.verify, http.cert = verify, cert
    settings = http.merge_environment_settings(url, dict(proxies), stream, call_verify, None)
    if call_verify is None:
        settings["verify"] = verify
    return settings


@pytest.mark.parametrize("environment", ENVIRONMENTS)
@pytest.mark.parametrize("verify,cert", [(True, None), (False, None), ("/etc/ca.pem", ("c.pem", "k.pem"))])
def test_the_settings_are_requests_own_for_every_server_asked_again_and_again(monkeypatch, environment, verify, cert):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "requests_ca_bundle", "curl_ca_bundle"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    http = session(verify, cert)
    for _ in range(2):  # the second time from what the first worked out
        for url in URLS:
            for proxies, stream, call_verify in [({}, False, None), ({}, True, None),
                                                 ({"https": "http://explicit.example:1"}, False, None),
                                                 ({}, False, False)]:
                got = http.merge_environment_settings(url, dict(proxies), stream, call_verify, None)
                assert got == plain_merge(verify, cert, url, proxies, stream, call_verify)


def test_a_caller_changing_the_proxies_it_got_changes_nothing_for_the_next_request(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    http = session()
    first = http.merge_environment_settings(URLS[1], {}, False, None, None)
    first["proxies"]["https"] = "http://elsewhere.example:1"
    assert http.merge_environment_settings(URLS[1], {}, False, None, None)["proxies"]["https"] == \
        "http://proxy.example:3128"
