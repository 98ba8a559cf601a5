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


def requests_made(driver: Any) -> list[str]:
    """URLs of every request the browser started since the last call (data: URLs included)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            params = message["params"]
            urls.append(params.get("request", {}).get("url") or params.get("url", ""))
    return urls


def console_errors(driver: Any) -> list[str]:
    """Console messages of level SEVERE (a blocked request shows up here as a CSP violation)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
