"""ruff and mypy are part of the one test command, so CI enforces them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BIN = str(Path(sys.executable).parent)


def _tool(name: str) -> str:
    path = shutil.which(name, path=BIN)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def test_ruff_check_and_format() -> None:
    ruff = _tool("ruff")
    paths = ["flctl", "tests", "bench", "templates"]
    check = subprocess.run([ruff, "check", *paths], cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    fmt = subprocess.run(
        [ruff, "format", "--check", *paths], cwd=REPO, capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout


@pytest.mark.timeout(600)
def test_mypy_strict_on_the_package() -> None:
    mypy = _tool("mypy")
    result = subprocess.run([mypy], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-5000:]
