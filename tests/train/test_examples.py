"""Every example under examples/train/ starts with the command that runs it and is a valid config;
the tiny one runs as its comments say."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dtm_fast.train.config import load_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples" / "train").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_starts_with_its_command_and_loads(example):
    assert example.read_text().startswith(f"# dtm train examples/train/{example.name}")
    config = load_config(example)
    assert config.model and config.data and config.output_dir


def test_tiny_example_runs_as_written(tmp_path):
    text = (REPO / "examples" / "train" / "tiny-full.yaml").read_text()
    # the set-up commands the example's comments give, run from a scratch directory
    setup = [line.split("#   ", 1)[1] for line in text.splitlines() if line.startswith("#   python -c")]
    assert len(setup) == 2
    (tmp_path / "runs").mkdir()
    (tmp_path / "examples" / "train").mkdir(parents=True)
    shutil.copyfile(REPO / "examples" / "train" / "tiny-full.yaml", tmp_path / "examples" / "train" / "tiny-full.yaml")
    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for command in setup:
        code = command[len('python -c "'):-1]
        subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=environment)
    command = [sys.executable, "-m", "dtm_fast.cli", "train", "examples/train/tiny-full.yaml", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs" / "sub-0" / "model.safetensors.index.json").is_file()
    steps = len((tmp_path / "runs" / "sub-0" / "metrics.jsonl").read_text().splitlines())
    assert json.loads((tmp_path / "runs" / "sub-0" / "dtm_train.json").read_text())["result"]["steps"] == steps
