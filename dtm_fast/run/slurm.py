"""`dtm run --emit slurm`: three batch scripts and a submit script that chains them.

    prepare.sbatch   one job: the GGUF base conversion (if any) and the dispersal
    train.sbatch     an array job, one task per training job (sub-0 .. sub-{K-1}, then vanilla), each
                     running torchrun on one node through `dtm run --stage train --index $SLURM_ARRAY_TASK_ID`;
                     with slurm.nodes > 1, each task holds that many nodes and `srun` starts torchrun on
                     every one of them, joined by torchrun's c10d rendezvous at the task's first node
                     (SLURM_JOB_NODELIST), on the job's YAML written beside the scripts
    finish.sbatch    the merge and the evaluation, after every array task succeeded
    submit.sh        sbatch prepare -> train (afterok) -> finish (afterok)

Every task calls `dtm run` on the same config, so each checks that its inputs are current and resumes
from its own checkpoints when a task is requeued.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from dtm_fast.run import stages
from dtm_fast.run.config import RunConfig


def _header(config: RunConfig, job: str, gpus: int, log_name: str, array: str | None = None,
            nodes: int = 1) -> list[str]:
    slurm = config.slurm
    lines = ["#!/bin/bash", f"#SBATCH --job-name={slurm.job_name}-{job}", f"#SBATCH --nodes={nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --cpus-per-task={slurm.cpus_per_task}",
             f"#SBATCH --time={slurm.time}", f"#SBATCH --output={config.run_dir / 'logs' / log_name}"]
    if gpus:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    if array:
        lines.append(f"#SBATCH --array={array}")
    for option, value in (("partition", slurm.partition), ("account", slurm.account), ("qos", slurm.qos),
                          ("mem", slurm.mem)):
        if value:
            lines.append(f"#SBATCH --{option}={value}")
    lines += [f"#SBATCH {extra}" for extra in slurm.extra_sbatch]
    lines += ["set -euo pipefail", *slurm.setup]
    return lines


RENDEZVOUS_PORT_BASE = 29500


def _multi_node_training(config: RunConfig, folder: Path, jobs: list[str], gpus: int, nodes: int) -> list[str]:
    """The body of a multi-node training task: every node runs torchrun (one srun task per node),
    and the nodes meet at a c10d rendezvous on the task's first node. The job's YAML is written now,
    beside the scripts: `dtm train` continues a checkpoint of the same settings by itself when a
    task is requeued, so the YAML needs no per-attempt resume flag."""
    import yaml

    configs = folder / "train-configs"
    configs.mkdir(parents=True, exist_ok=True)
    for name in jobs:
        values = stages.train_config(config, config.job(name)).to_dict()
        (configs / f"{name}.yaml").write_text(
            f"# written by dtm run --emit slurm from {config.config_path}; rerun that after editing it\n"
            + yaml.safe_dump(values, sort_keys=False))
    job_list = " ".join(shlex.quote(name) for name in jobs)
    launch = (f"srun --nodes={nodes} --ntasks-per-node=1 {shlex.quote(sys.executable)} -m torch.distributed.run "
              f"--nnodes={nodes} --nproc-per-node={gpus} --rdzv-backend=c10d "
              '--rdzv-endpoint="$head_node:$rdzv_port" --rdzv-id="$SLURM_JOB_ID" '
              f'-m dtm_fast.train {shlex.quote(str(configs))}/"$job".yaml --quiet')
    return [
        f"jobs=({job_list})",
        'job="${jobs[$SLURM_ARRAY_TASK_ID]}"',
        "# the rendezvous: this task's first node, a port of its own (array tasks may share a node)",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"rdzv_port=$(( {RENDEZVOUS_PORT_BASE} + SLURM_JOB_ID % 10000 ))",
        launch,
    ]


def emit_slurm(config: RunConfig, output: Path | None = None) -> dict[str, Path]:
    """Write the scripts into output (default run_dir/slurm); returns them by name."""
    folder = output or config.run_dir / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    (config.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    # the same interpreter and config this command ran with, so a node uses the same install
    dtm = f"{shlex.quote(sys.executable)} -m dtm_fast.cli run {shlex.quote(str(config.config_path))} " \
          f"--output {shlex.quote(str(config.run_dir))}"
    gpus = config.slurm.gpus_per_node
    jobs = config.job_names()
    nodes = config.slurm.nodes
    train_lines = _header(config, "train", gpus, "train-%A-%a.log", array=f"0-{len(jobs) - 1}", nodes=nodes)
    train_lines.append(f"# task i trains job i of: {' '.join(jobs)}")
    if nodes > 1:
        train_lines += _multi_node_training(config, folder, jobs, max(1, gpus), nodes)
    else:
        train_lines.append(f"{dtm} --stage train --index \"$SLURM_ARRAY_TASK_ID\" --nproc-per-node {max(1, gpus)}")
    scripts = {
        "prepare": _header(config, "prepare", 0, "prepare-%j.log") + [f"{dtm} --stage prepare"],
        "train": train_lines,
        "finish": _header(config, "finish", min(gpus, 1), "finish-%j.log") + [f"{dtm} --stage finish"],
    }
    written = {}
    for name, lines in scripts.items():
        path = folder / f"{name}.sbatch"
        path.write_text("\n".join(lines) + "\n")
        written[name] = path
    submit = folder / "submit.sh"
    submit.write_text("\n".join([
        "#!/bin/bash",
        f"# submits the DTM run of {config.config_path}: prepare -> {len(jobs)} training tasks -> merge + eval",
        "set -euo pipefail",
        f"cd {shlex.quote(str(folder))}",
        "prepare=$(sbatch --parsable prepare.sbatch)",
        "train=$(sbatch --parsable --dependency=afterok:$prepare train.sbatch)",
        "finish=$(sbatch --parsable --dependency=afterok:$train finish.sbatch)",
        'echo "submitted: prepare $prepare, train array $train, merge+eval $finish"',
        f"echo \"report when done: {stages.report_dir(config) / 'report.md'}\"",
    ]) + "\n")
    submit.chmod(0o755)
    written["submit"] = submit
    return written
