"""The type check, run like the import contracts are: mypy over every product package, with the settings in
pyproject.toml ([tool.mypy]: strict on engine/, fleet/, store/; standard on tui/ and the CLI). A failure shows
mypy's own lines, so the message says which file, line and rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["engine", "fleet", "store", "tui", "fleetdeck"]


def test_mypy_passes() -> None:
    # The venv's own interpreter, so mypy sees the same installed stubs and plugins (pydantic.mypy) as the code;
    # cwd is the checkout under test, so it checks these files, not the editable install's.
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *PACKAGES],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout
