"""Headless Chromium for the report tests and the docs screenshot: Debian's `chromium` and
`chromium-driver` packages driven by Selenium, with every network request the page makes recorded.

Selenium rather than Playwright: Debian ships chromedriver built from the same source as its chromium,
so driver and browser always match; Playwright's Python package carries its own Node.js driver, is
released against its own Chromium builds, and its usual setup (`playwright install`) downloads a browser,
which we must never do. Selenium Manager is kept out of it: the driver path is explicit and SE_OFFLINE is
set, so nothing is downloaded."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# As root in a container: no sandbox; and no background traffic of Chromium's own (updates, sync, field
# trials), which would otherwise show up as requests and hit this machine's closed network.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars")


def missing() -> list[str]:
    """What is not installed (empty when the browser tests can run)."""
    absent = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        absent.append("the selenium package (pip install -e '.[test]')")
    return absent


@contextmanager
def chromium(width: int = 1200, height: int = 900) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager, if it ever runs, must not download
    with tempfile.TemporaryDirectory(prefix="anc-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.add_argument(f"--window-size={width},{height}")
        # The performance log carries the DevTools Network events: every request the page starts.
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
        try:
            # Start the record clean: what the browser's own start page loaded is not the report's doing.
            driver.get("about:blank")
            driver.get_log("performance")
            driver.get_log("browser")
            yield driver
        finally:
            driver.quit()


@dataclass(frozen=True)
class Request:
    url: str
    blocked: str | None  # why the browser stopped it before it left (e.g. "csp"), None if it went out


def requests_made(driver: Any) -> list[Request]:
    """Every request the browser started since the last call (data: URLs included), in order. A request
    the Content-Security-Policy stops is still announced by DevTools, then failed with a blockedReason."""
    started: dict[str, str] = {}
    blocked: dict[str, str] = {}
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message.get("method") == "Network.requestWillBeSent":
            started.setdefault(params["requestId"], params["request"]["url"])
        elif message.get("method") == "Network.webSocketCreated":
            started.setdefault(params["requestId"], params["url"])
        elif message.get("method") == "Network.loadingFailed" and params.get("blockedReason"):
            blocked[params["requestId"]] = params["blockedReason"]
    return [Request(url, blocked.get(request_id)) for request_id, url in started.items()]


def console_errors(driver: Any) -> list[str]:
    """Console messages of level SEVERE (a blocked request shows up here as a CSP violation)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
