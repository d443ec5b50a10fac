"""Every example config under examples/dtm/ starts with the command that runs it and passes every
stage's checks (with its data and model paths pointed at the tiny fixtures)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dtm_fast.run import evaluation
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
    values.pop("gguf_file", None)
    # local task files an example's data command writes are the fixture's questions here
    values["eval"]["tasks"] = [f"mmlu={assets / 'mmlu.jsonl'}" if "=" in task else task for task in values["eval"]["tasks"]]
    config = parse_run_config(values, example)
    plan = Walk(config, execute=False).walk()
    cells = config.cells()
    merges = [config.merged_name(cell, setting) for cell in cells for setting in config.merges]
    names = [s.name for s in plan]
    assert sorted(names) == sorted(["base", *(f"{c.prefix}disperse" for c in cells), *config.job_names(), *merges,
                                    *(f"eval {m.spec.id}" for m in evaluation.eval_models(config)), "report"])
    assert names[0] == "base" and names[-1] == "report"
    assert not (tmp_path / "run").exists()


def test_the_paper_setting_example():
    values = yaml.safe_load((REPO / "examples" / "dtm" / "llama2-7b-tulu-k4.yaml").read_text())
    assert values["k"] == 4 and values["launch"]["nproc_per_node"] == 8
    assert values["train"]["lora_r"] == 16 and values["merge"]["method"] == "linear"


def test_the_cpu_fidelity_example_is_the_experiment_issue_12_asks_for():
    values = yaml.safe_load((REPO / "examples" / "dtm" / "cpu-fidelity.yaml").read_text())
    assert values["k"] == 4 and values["seeds"] == [0, 1, 2] and values["vanilla"] is True
    assert values["gguf_file"].startswith("SmolLM2-135M")
    # equal compute: set in epochs, so the four sub-models together see what vanilla sees
    assert "max_steps" not in values["train"] and values["train"]["epochs"] == 1
    assert values["eval"]["tasks"] == ["mmlu=data/mmlu-1000.jsonl"]
