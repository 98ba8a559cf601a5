"""What an operator expects of the installed command itself."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_version_prints_the_installed_version_and_exits_0():
    done = subprocess.run([sys.executable, "-m", "adapter", "--version"], capture_output=True, text=True,
                          timeout=60, cwd="/")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"anc-adapter {declared}\n"
