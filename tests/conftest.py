"""Shared test configuration. Area-specific fixtures live beside their tests."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_INVENTORY = PROJECT_ROOT / "inventory" / "example"


@pytest.fixture
def example_inventory() -> Path:
    return EXAMPLE_INVENTORY
