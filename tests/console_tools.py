"""Finding the linters and validators the test extra installs (shellcheck, hadolint, ...)."""

from __future__ import annotations

import shutil
import sys
import sysconfig
from pathlib import Path


def console_tool(name: str) -> str:
    """A console tool installed into this interpreter's environment (on PATH or not: CI runs .venv/bin/python)."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[test]' brings it"
    return found
