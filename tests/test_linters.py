"""Linters run as tests (after mkosi's tests/test_linters.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def lint(*argv: str) -> None:
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(argv)}\n{result.stdout}\n{result.stderr}"


def test_ruff_check() -> None:
    lint(str(BIN / "ruff"), "check", "provision", "tests", "bench")


def test_ruff_format() -> None:
    lint(str(BIN / "ruff"), "format", "--check", "provision", "tests", "bench")


def test_mypy_strict() -> None:
    lint(str(BIN / "mypy"), "provision")


def test_yamllint() -> None:
    lint(str(BIN / "yamllint"), "--strict", ".")


@pytest.mark.integration
def test_ansible_lint_production() -> None:
    lint(str(BIN / "ansible-lint"), "--offline", "--profile", "production", "playbooks", "roles")
