"""`dtm run --emit slurm`: a prepare job, an array job with one task per training job, and a merge +
eval job after it, chained by afterok dependencies."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.run.conftest import dtm, write_config


def test_emitted_scripts(assets):
    path = write_config(assets, "cluster.yaml", run_dir="run-cluster",
                        slurm={"partition": "gpu", "gpus_per_node": 8, "time": "12:00:00",
                               "setup": ["source /opt/venv/bin/activate"], "extra_sbatch": ["--exclusive"]})
    assert dtm("run", str(path), "--emit", "slurm", "--quiet") == 0
    folder = assets / "run-cluster" / "slurm"
    train = (folder / "train.sbatch").read_text()
    assert "#SBATCH --array=0-2\n" in train  # sub-0, sub-1, vanilla
    assert "#SBATCH --gpus-per-node=8\n" in train
    assert "#SBATCH --partition=gpu\n" in train and "#SBATCH --time=12:00:00\n" in train
    assert "#SBATCH --exclusive\n" in train
    assert train.index("source /opt/venv/bin/activate") < train.index("dtm_fast.cli run")
    assert f"run {path} --output {assets / 'run-cluster'} --stage train --index \"$SLURM_ARRAY_TASK_ID\" " \
           "--nproc-per-node 8" in train
    assert "--stage prepare" in (folder / "prepare.sbatch").read_text()
    finish = (folder / "finish.sbatch").read_text()
    assert "--stage finish" in finish and "#SBATCH --gpus-per-node=1\n" in finish
    submit = (folder / "submit.sh").read_text()
    assert "train=$(sbatch --parsable --dependency=afterok:$prepare train.sbatch)" in submit
    assert "finish=$(sbatch --parsable --dependency=afterok:$train finish.sbatch)" in submit
    # nothing ran: emitting only writes scripts
    assert not (assets / "run-cluster" / "portions").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_emitted_scripts_are_valid_bash(assets):
    path = write_config(assets, "cluster-syntax.yaml", run_dir="run-cluster-syntax", vanilla=False)
    assert dtm("run", str(path), "--emit", "slurm", "--quiet") == 0
    folder = assets / "run-cluster-syntax" / "slurm"
    assert "#SBATCH --array=0-1\n" in (folder / "train.sbatch").read_text()
    for script in ("prepare.sbatch", "train.sbatch", "finish.sbatch", "submit.sh"):
        result = subprocess.run(["bash", "-n", str(folder / script)], capture_output=True, text=True)
        assert result.returncode == 0, (script, result.stderr)
