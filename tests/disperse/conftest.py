"""Fixtures for the dispersal tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from .data_factory import alpaca_records, write_jsonl


@pytest.fixture
def alpaca_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "alpaca.jsonl", alpaca_records(23))
