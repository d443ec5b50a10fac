"""A `dtm run` killed mid-training resumes from the sub-model's checkpoint and finishes with the same
merged weights as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.run.conftest import REPO, dtm, write_config
from tests.run.test_end_to_end import weights

pytestmark = pytest.mark.slow


def start_run(config: Path, *options: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "dtm_fast.cli", "run", str(config), "--quiet", *options],
                            cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def kill_when(process: subprocess.Popen, condition, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed: {process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError("the condition to kill the run never came")
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the run and its training subprocess, as a crash would
    process.wait()


def test_killed_mid_training_resumes_to_the_same_weights(assets, finished_run, capsys):
    # the merged weights depend on the sub-models only: no vanilla job, no evaluation, to stay quick
    config = write_config(assets, "killed.yaml", run_dir="run-killed", vanilla=False)
    run_dir = assets / "run-killed"
    process = start_run(config, "--until", "merge")
    kill_when(process, lambda: any(run_dir.glob("sub-0.checkpoints-*/step-00000002")))
    assert not (run_dir / "sub-0" / "dtm_train.json").exists(), "sub-0 finished before the kill"

    capsys.readouterr()
    assert dtm("run", str(config), "--dry-run", "--quiet", "--until", "merge") == 0
    plan = capsys.readouterr().out
    sub0 = next(line for line in plan.splitlines() if line.startswith("sub-0"))
    assert "resumes from its checkpoint at step" in sub0, plan

    assert dtm("run", str(config), "--quiet", "--until", "merge") == 0
    assert not (run_dir / "report").exists()
    checkpoints = list(run_dir.glob("sub-0.checkpoints-*"))
    assert len(checkpoints) == 1  # the resumed job used the checkpoints it wrote
    metrics = (checkpoints[0] / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 6  # steps after the checkpoint were trained once more, none twice
    reference = weights(finished_run.parent / "run-uninterrupted" / "merged")
    resumed = weights(run_dir / "merged")
    assert set(resumed) == set(reference)
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
