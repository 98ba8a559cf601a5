"""The real local FHIR R4 server (Sekmet, DOMAIN.md §8) for the demo and the tests: the one place that
starts it. Loopback only, a free port, a fresh in-memory database per start, the simulator off."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from adapter.errors import ConfigError

SETTINGS = """\
simulator: {enabled: false}
log_inbound: false
validation: {inbound: strict}
"""
_START = "from sekmet.cli import app; app()"


@contextmanager
def sekmet(database: str = ":memory:", startup_timeout_s: float = 60.0, settings: str = "") -> Iterator[str]:
    """Start Sekmet on 127.0.0.1 and yield its base URL; stop it on exit. `settings`: more YAML lines for
    its settings file (e.g. `subscriptions: {notify_method: post-endpoint}`)."""
    with sekmet_process(database, startup_timeout_s, settings) as (base_url, _):
        yield base_url


@contextmanager
def sekmet_process(database: str = ":memory:", startup_timeout_s: float = 60.0,
                   settings: str = "") -> Iterator[tuple[str, subprocess.Popen]]:
    """As sekmet(), also yielding the server's process (the benchmark reads the server's own CPU)."""
    try:
        import sekmet  # noqa: F401
    except ImportError:
        raise ConfigError(
            "the local FHIR server needs the demo extra: pip install 'anc-adapter[demo]'"
        ) from None
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}/fhir"
    with tempfile.TemporaryDirectory(prefix="anc-sekmet-") as workdir:
        settings_file = Path(workdir, "settings.yaml")
        settings_file.write_text(SETTINGS + settings)
        env = {
            **os.environ,
            "SEKMET_CONFIG": str(settings_file),
            "SEKMET_PORT": str(port),
            "SEKMET_BASE_URL": base_url,
            "SEKMET_DB": database,
        }
        log_file = open(Path(workdir, "sekmet.log"), "wb")
        process = subprocess.Popen(
            [sys.executable, "-c", _START, "serve", "--host", "127.0.0.1"],
            cwd=workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )
        try:
            _wait_ready(base_url, process, startup_timeout_s, Path(workdir, "sekmet.log"))
            yield base_url, process
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log_file.close()


def _wait_ready(base_url: str, process: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Sekmet exited at start-up:\n{log_path.read_text()[-2000:]}")
        try:
            if requests.get(f"{base_url}/metadata", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"Sekmet did not answer /metadata within {timeout_s:.0f} s")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
