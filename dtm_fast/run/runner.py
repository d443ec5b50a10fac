"""Walk the stages in order: each one is skipped when current, else run (or, for a dry run, listed
with what it would do). A stage whose inputs are not yet current cannot be judged and "waits".

Training jobs run as subprocesses (`python -m dtm_fast.train job.yaml`, or torchrun with
--nproc-per-node N), one after another: the same entry a SLURM array task uses, and a crash or kill of
one job leaves its checkpoints for the next `dtm run` to resume.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtm_fast import __version__, ui
from dtm_fast.errors import DtmError
from dtm_fast.run import stages
from dtm_fast.run.config import RunConfig, describe

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedStage:
    name: str
    output: Path
    state: str   # "current" or "to run"
    detail: str = ""


class Walk:
    """One pass over the stages. execute=False only looks (the dry run)."""

    def __init__(self, config: RunConfig, execute: bool, nproc_per_node: int | None = None,
                 group: str = "all", job_index: int | None = None, until: str = "eval"):
        self.config = config
        self.execute = execute
        self.nproc = nproc_per_node or config.nproc_per_node
        self.group = group
        self.job_index = job_index
        self.until = until  # the last stage to look at
        self.hashes = stages.hash_cache(config)
        self.identities: dict[str, str] = {}
        self.plan: list[PlannedStage] = []
        self.blocker: str | None = None  # the first stage not current: later ones cannot be judged

    def _note(self, name: str, output: Path, status: stages.Status | None) -> None:
        if status is None:
            self.plan.append(PlannedStage(name, output, "to run", f"after {self.blocker} (judged then)"))
        elif status.current:
            self.plan.append(PlannedStage(name, output, "current"))
        else:
            self.plan.append(PlannedStage(name, output, "to run", status.detail))

    def _stage(self, name: str, output: Path, check, run, in_group: bool) -> None:
        """check() -> Status; run() does the work. Records the identity of a current stage."""
        if self.blocker is not None:
            self._note(name, output, None)
            return
        status = check()
        self._note(name, output, status)
        if status.current:
            self.identities[name] = status.identity
            return
        if not (self.execute and in_group):
            self.blocker = name
            return
        ui.info(f"[dtm run] {name}: {status.detail}")
        run()
        status = check()
        if not status.current:
            raise DtmError(f"{name}: finished but its output {output} is not current ({status.detail}); "
                           "this is a bug in dtm_fast, please report it")
        self.identities[name] = status.identity

    def walk(self) -> list[PlannedStage]:
        config, group = self.config, self.group
        if self.execute:
            config.run_dir.mkdir(parents=True, exist_ok=True)
            stages.state_dir(config).mkdir(exist_ok=True)
            record = {"tool": "dtm_fast run", "version": __version__, "config": describe(config)}
            if stages.read_json(config.run_dir / "dtm_run.json") != json.loads(json.dumps(record, default=str)):
                stages.write_json(config.run_dir / "dtm_run.json", record)  # unchanged: left untouched
        prepare = group in ("all", "prepare")
        self._stage("base", stages.base_dir(config), lambda: stages.base_status(config, self.hashes),
                    lambda: convert_gguf_base(config, self.hashes), prepare)
        self._stage("disperse", stages.portions_dir(config), lambda: stages.disperse_status(config),
                    lambda: run_disperse(config), prepare)
        if group == "prepare" or self.until == "disperse":
            return self.plan
        for index, name in enumerate(config.job_names()):
            in_group = group == "all" or (group == "train" and index == self.job_index)
            if group == "train" and index != self.job_index:
                continue
            self._stage(name, stages.job_dir(config, name),
                        lambda name=name: stages.train_status(config, name, self.hashes),
                        lambda name=name: run_training(config, name, self.nproc), in_group)
        if group == "train" or self.until == "train":
            return self.plan
        finish = group in ("all", "finish")
        self._stage("merge", stages.merged_dir(config), lambda: stages.merge_status(config, self.identities),
                    lambda: run_merge_stage(config, self.identities), finish)
        if self.until == "merge":
            return self.plan
        self._stage("eval", stages.report_dir(config),
                    lambda: stages.eval_status(config, self.identities, self.hashes),
                    lambda: run_eval_stage(config, self.identities, self.hashes), finish)
        return self.plan


def show_plan(plan: list[PlannedStage], title: str) -> None:
    ui.table(title, ["stage", "state", "output", "what happens"],
             [[s.name, s.state, str(s.output), s.detail] for s in plan])


# ---- the stages' work -------------------------------------------------------------------------------
def convert_gguf_base(config: RunConfig, hashes: stages.HashCache) -> None:
    """De-quantise the GGUF base once into a float32 Hugging Face directory, which the trainer, the
    merger (LoRA needs the base's tensors) and the evaluation all read."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = stages.base_dir(config)
    source = config.base_model / config.gguf_file
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(config.base_model), gguf_file=config.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(str(config.base_model), gguf_file=config.gguf_file,
                                                     dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise DtmError(f"{config.where}: gguf_file: cannot load {source}: {error}") from None
    # the weights are plain float32 once loaded; the GGUF "quantizer" transformers attaches only
    # records where they came from, and would make save_pretrained refuse
    model.hf_quantizer = None
    for holder in (model, model.config):
        for attribute in ("quantization_config", "is_quantized"):
            if attribute in vars(holder):
                delattr(holder, attribute)
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    stages.write_json(temporary / stages.BASE_MANIFEST,
                      {"tool": "dtm_fast run", "version": __version__,
                       "source": {"gguf": str(source), "sha256": hashes.sha256(source)}})
    shutil.rmtree(target, ignore_errors=True)
    temporary.rename(target)


def run_disperse(config: RunConfig) -> None:
    from dtm_fast.data.records import read_records
    from dtm_fast.disperse.pipeline import disperse

    disperse_config = stages.disperse_config(config)
    # K against the record count here, so the error names the config's field
    count = sum(len(read_records(path)) for path in disperse_config.inputs)
    if config.k > count:
        raise DtmError(f"{config.where}: k = {config.k} is larger than the {count} records in data "
                       f"({', '.join(disperse_config.inputs)}); lower k or add data")
    disperse(disperse_config)


def training_command(config: RunConfig, name: str, nproc: int) -> list[str]:
    yaml_path = stages.train_config_path(config, name)
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                "-m", "dtm_fast.train", str(yaml_path)]
    return [sys.executable, "-m", "dtm_fast.train", str(yaml_path)]


def write_training_config(config: RunConfig, name: str) -> Path:
    """The job's YAML, resuming when a checkpoint of this very job exists."""
    import yaml

    from dtm_fast.train.checkpoint import complete_checkpoints

    fingerprint = stages.train_fingerprint(config, name)
    record_path = stages.state_dir(config) / f"train-{name}.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    checkpoints_path = stages.train_config(config, name).checkpoints_path
    resume = bool(complete_checkpoints(checkpoints_path)) and record.get("fingerprint") == fingerprint
    if not resume:
        # checkpoints of another job's settings or data: a later resume must never pick them up
        shutil.rmtree(checkpoints_path, ignore_errors=True)
    stages.write_json(record_path, {"fingerprint": fingerprint})
    path = stages.train_config_path(config, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = stages.train_config(config, name, resume=resume).to_dict()
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(f"# written by dtm run from {config.config_path}; run it with:\n"
                         f"#   python -m dtm_fast.train {path}\n" + yaml.safe_dump(values, sort_keys=False))
    os.replace(temporary, path)
    return path


def run_training(config: RunConfig, name: str, nproc: int) -> None:
    write_training_config(config, name)
    command = training_command(config, name, nproc)
    logger.info("running %s", " ".join(command))
    code = subprocess.call(command)
    if code != 0:
        raise DtmError(f"training {name} failed (exit code {code}); its checkpoints are kept in "
                       f"{stages.train_config(config, name).checkpoints_path}: fix the cause and rerun "
                       "dtm run to resume")


def run_merge_stage(config: RunConfig, identities: dict[str, str]) -> None:
    from dtm_fast.io.output import partial_dir
    from dtm_fast.merge.engine import run_merge

    fingerprint = stages.merge_fingerprint(config, identities)
    record_path = stages.state_dir(config) / "merge.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    partial = partial_dir(stages.merged_dir(config))
    if partial.exists() and record.get("fingerprint") != fingerprint:
        shutil.rmtree(partial)  # an interrupted merge of other sub-models: nothing in it can be reused
    stages.record_stage(config, "merge", fingerprint, complete=False)
    models = [stages.job_dir(config, f"sub-{i}") for i in range(config.k)]
    run_merge(stages.merge_config(config, models, resume=partial.exists()))
    stages.record_stage(config, "merge", fingerprint, complete=True)


def run_eval_stage(config: RunConfig, identities: dict[str, str], hashes: stages.HashCache) -> None:
    from dtm_fast.eval.pipeline import evaluate

    fingerprint = stages.eval_fingerprint(config, identities, hashes)
    stages.record_stage(config, "eval", fingerprint, complete=False)
    if stages.lora_training(config):
        from dtm_fast.io.output import partial_dir
        from dtm_fast.merge.engine import run_merge

        # lm_eval loads full models: each adapter is applied to the base once, for the evaluation
        for name in config.job_names():
            shutil.rmtree(partial_dir(stages.materialized_dir(config, name)), ignore_errors=True)
            run_merge(stages.materialize_config(config, name))
    evaluate(stages.eval_config(config))
    stages.record_stage(config, "eval", fingerprint, complete=True)


def show_report(config: RunConfig) -> dict[str, Any] | None:
    from dtm_fast.eval.report import table_rows

    path = stages.report_dir(config) / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    columns, rows = table_rows(report)
    ui.table("alignment tax" + (f" (difference to {report['base']})" if report.get("base") else ""), columns, rows)
    ui.info(f"report: {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')}")
    return report
