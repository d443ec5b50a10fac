"""Every example config under examples/dtm/ starts with the command that runs it and passes every
stage's checks (with its data and model paths pointed at the tiny fixtures)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dtm_fast.run.config import parse_run_config
from dtm_fast.run.runner import Walk
from tests.run.conftest import REPO

EXAMPLES = sorted((REPO / "examples" / "dtm").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_is_valid(example: Path, assets, tmp_path):
    text = example.read_text()
    assert text.startswith(f"# dtm run examples/dtm/{example.name}\n")
    values = yaml.safe_load(text)
    values.update(data=[str(assets / "data.jsonl")], base_model=str(assets / "base"), run_dir=str(tmp_path / "run"))
    config = parse_run_config(values, example)
    assert config.k == 4 and config.nproc_per_node == 8
    plan = Walk(config, execute=False).walk()
    assert [s.name for s in plan] == ["base", "disperse", "sub-0", "sub-1", "sub-2", "sub-3", "vanilla", "merge",
                                      "eval"]
    assert not (tmp_path / "run").exists()
