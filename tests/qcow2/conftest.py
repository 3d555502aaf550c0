"""Fixtures for the qcow2 reader tests (helpers live in qcow2_oracle.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    d = tmp_path / "scratch"
    d.mkdir()
    return d
