"""Playing the EHR against `anc-adapter serve`: a CDS client's signing key and JWKS, signed JWTs, hook
requests, the service started as a process, and a listener that records any connection made to it.
Keys are made per test run and die with its temporary directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import jwt
import requests
from jwt.algorithms import ECAlgorithm

from pki import ec_key


class Ehr:
    """A CDS client: an ES384 key whose public half is in a JWKS file the service is configured with."""

    def __init__(self, directory: Path, iss: str = "https://ehr.hospital.test", kid: str = "ehr-2026"):
        self.iss, self.kid = iss, kid
        self.key = ec_key()
        jwk = ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        jwk.update(kid=kid, use="sig", alg="ES384")
        self.jwks_file = directory / f"jwks-{kid}.json"
        self.jwks_file.write_text(json.dumps({"keys": [jwk]}))

    def token(self, aud: str, key: Any = None, algorithm: str = "ES384", headers: dict | None = None,
              **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": self.iss, "sub": "ehr-client", "aud": aud, "iat": now, "exp": now + 300,
                "jti": uuid.uuid4().hex, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key if key is not None else self.key, algorithm=algorithm,
                          headers={"kid": self.kid, "typ": "JWT", **(headers or {})})


def bundle(*resources: dict) -> dict:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"resource": r} for r in resources]}


def hook_request(hook: str, patient_id: str, fhir_server: str | None = None, access_token: str | None = None,
                 prefetch: dict | None = None, draft_orders: dict | None = None) -> dict:
    request: dict[str, Any] = {
        "hook": hook,
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/pr-1", "patientId": patient_id},
    }
    if draft_orders is not None:
        request["context"]["draftOrders"] = draft_orders
    if fhir_server is not None:
        request["fhirServer"] = fhir_server
    if access_token is not None:
        request["fhirAuthorization"] = {"access_token": access_token, "token_type": "Bearer",
                                        "expires_in": 300, "scope": "patient/*.read", "subject": "anc-adapter"}
    if prefetch is not None:
        request["prefetch"] = prefetch
    return request


@dataclass
class ServeProcess:
    process: subprocess.Popen
    log_path: Path
    base_url: str = ""

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def events(self) -> list[dict]:
        found = []
        for line in self.log().splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                pass
        return found

    def url(self, service_id: str = "") -> str:
        return f"{self.base_url}/cds-services" + (f"/{service_id}" if service_id else "")

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


@contextmanager
def serve_process(config_path: Path, directory: Path, startup_timeout_s: float = 60.0,
                  port: int = 0, log_name: str = "serve.log") -> Iterator[ServeProcess]:
    """`anc-adapter serve` on a loopback port (by default a free one; the port comes from its start-up log
    line)."""
    log_path = directory / log_name
    log_file = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "adapter", "serve", "--config", str(config_path), "--host", "127.0.0.1",
         "--port", str(port), "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=log_file, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    served = ServeProcess(process, log_path)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while time.monotonic() < deadline and not served.base_url:
            if process.poll() is not None:
                raise RuntimeError(f"serve exited at start-up ({process.returncode}):\n{served.log()[-2000:]}")
            start = next((e for e in served.events() if e.get("event") == "serve-start"), None)
            if start:
                served.base_url = f"http://127.0.0.1:{start['port']}"
            time.sleep(0.05)
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{served.base_url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"serve did not become healthy:\n{served.log()[-2000:]}")
        yield served
    finally:
        if process.poll() is None:
            try:
                served.stop()
            except subprocess.TimeoutExpired:
                pass
        log_file.close()


@dataclass
class RecordingListener:
    """A TCP listener on loopback that accepts and counts every connection (and reads nothing useful to
    anyone): the target of a fhirServer the service must never contact."""

    connections: int = 0
    _socket: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0)))
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._socket.getsockname()[1]}/fhir"

    def __enter__(self) -> RecordingListener:
        self._socket.settimeout(0.05)
        self._thread = threading.Thread(target=self._accept, name="listener", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            connection.close()
