"""Make docs/report-demo.png: run `anc-adapter demo` (its go-live review writes a report from the demo
data), open that report in headless Chromium and capture the page from the top down to the timeline of
the demo patient with a course of counts and the febrile patient after chemotherapy.

    .venv/bin/python tests/report_screenshot.py [docs/report-demo.png]

Needs Debian's chromium and chromium-driver (see tests/browser.py); downloads nothing."""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from adapter.cli import main  # noqa: E402
from browser import chromium, missing, requests_made  # noqa: E402

WIDTH = 1100


def demo_report() -> Path:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", "--log-format", "json", "--log-level", "WARNING"])
    if code != 0:
        raise SystemExit(f"anc-adapter demo exited {code}")
    found = re.search(r"Open it in a browser: file://(\S+)", printed.getvalue())
    if not found:
        raise SystemExit("the demo did not say where its report is")
    return Path(found.group(1))


def screenshot(report: Path, target: Path) -> None:
    with chromium(WIDTH, 900) as driver:
        driver.get(report.resolve().as_uri())
        leaked = [r.url for r in requests_made(driver) if r.url != report.resolve().as_uri()]
        if leaked:
            raise SystemExit(f"the report made requests: {leaked}")
        # Down to the demo's patient with a course of counts and its febrile patient after chemotherapy,
        # whichever comes later (the page goes on with one chart per patient).
        height = driver.execute_script(
            "const s = [...document.querySelectorAll('section.patient[data-patient=\"demo-chemo-course\"],"
            " section.patient[data-patient=\"demo-febrile\"]')];"
            "return s.length ? Math.max(...s.map(e => e.getBoundingClientRect().bottom)) + window.scrollY"
            " : document.documentElement.scrollHeight")
        driver.set_window_size(WIDTH, int(height) + 20)
        target.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(target))


if __name__ == "__main__":
    if missing():
        raise SystemExit("not installed: " + ", ".join(missing()))
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/report-demo.png")
    screenshot(demo_report(), out)
    print(f"wrote {out}")
