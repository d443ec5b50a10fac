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


def test_multi_node_training_uses_torchrun_rendezvous_from_the_slurm_environment(assets):
    import yaml

    path = write_config(assets, "multinode.yaml", run_dir="run-multinode",
                        slurm={"nodes": 4, "gpus_per_node": 8, "setup": ["source /opt/venv/bin/activate"]})
    assert dtm("run", str(path), "--emit", "slurm", "--quiet") == 0
    folder = assets / "run-multinode" / "slurm"
    train = (folder / "train.sbatch").read_text()
    assert "#SBATCH --nodes=4\n" in train and "#SBATCH --ntasks-per-node=1\n" in train
    assert "#SBATCH --gpus-per-node=8\n" in train and "#SBATCH --array=0-2\n" in train
    assert 'jobs=(sub-0 sub-1 vanilla)\njob="${jobs[$SLURM_ARRAY_TASK_ID]}"\n' in train
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n' in train
    assert "rdzv_port=$(( 29500 + SLURM_JOB_ID % 10000 ))\n" in train
    launch = next(line for line in train.splitlines() if line.startswith("srun "))
    assert launch.startswith("srun --nodes=4 --ntasks-per-node=1 ")
    for part in ("-m torch.distributed.run --nnodes=4 --nproc-per-node=8 --rdzv-backend=c10d",
                 '--rdzv-endpoint="$head_node:$rdzv_port" --rdzv-id="$SLURM_JOB_ID"',
                 f'-m dtm_fast.train {folder / "train-configs"}/"$job".yaml'):
        assert part in launch, part
    assert "--standalone" not in train  # that is the single-node form
    assert train.index("source /opt/venv/bin/activate") < train.index("srun ")
    # the job configs a task runs: what dtm run would train, every path absolute
    job = yaml.safe_load((folder / "train-configs" / "sub-1.yaml").read_text())
    assert job["output_dir"] == str(assets / "run-multinode" / "sub-1")
    assert job["data"] == [str(assets / "run-multinode" / "portions" / "portion-1.jsonl")]
    assert job["max_steps"] == 6 and job["resume"] is False
    # prepare and finish stay single-node jobs of dtm run
    assert "#SBATCH --nodes=1\n" in (folder / "prepare.sbatch").read_text()
    assert "#SBATCH --nodes=1\n" in (folder / "finish.sbatch").read_text()
    result = subprocess.run(["bash", "-n", str(folder / "train.sbatch")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_single_node_training_keeps_the_dtm_run_form(assets):
    path = write_config(assets, "onenode.yaml", run_dir="run-onenode", slurm={"nodes": 1, "gpus_per_node": 4})
    assert dtm("run", str(path), "--emit", "slurm", "--quiet") == 0
    train = (assets / "run-onenode" / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --nodes=1\n" in train and "srun" not in train and "--rdzv" not in train
    assert "--stage train --index \"$SLURM_ARRAY_TASK_ID\" --nproc-per-node 4" in train
