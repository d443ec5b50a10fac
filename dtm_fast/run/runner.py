"""Walk the stages in order: each one is skipped when current, else run (or, for a dry run, listed
with what it would do). A stage whose inputs are not yet current cannot be judged and waits for them.

Training jobs run as subprocesses (`python -m dtm_fast.train job.yaml`, or torchrun with
--nproc-per-node N), one after another: the same entry a SLURM array task uses, and a crash or kill of
one job leaves its checkpoints for the next `dtm run` to resume. Nothing dtm did not write is ever
deleted: outputs are published through io.owned_dir, checkpoints of other settings stay in their own
folder, and a stale partial merge is named for the user to remove.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dtm_fast import __version__, ui
from dtm_fast.errors import DtmError
from dtm_fast.run import evaluation, stages
from dtm_fast.run.config import RunConfig, describe
from dtm_fast.run.grid import Cell, Job, MergeSetting

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedStage:
    name: str
    output: Path
    state: str   # "current", "to run" or "waits"
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

    def _stage(self, name: str, output: Path, depends_on: tuple[str, ...], check: Callable[[], stages.Status],
               run: Callable[[], None], in_group: bool) -> None:
        """check() -> Status; run() does the work. A stage is judged once every stage it depends on
        is current; it records its identity for the stages after it."""
        missing = [dep for dep in depends_on if dep not in self.identities]
        if missing:
            self.plan.append(PlannedStage(name, output, "waits", f"after {missing[0]} (judged then)"))
            return
        status = check()
        if status.current:
            self.plan.append(PlannedStage(name, output, "current"))
            self.identities[name] = status.identity
            return
        self.plan.append(PlannedStage(name, output, "to run", status.detail))
        if not (self.execute and in_group):
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
            if stages.read_json(config.run_dir / "dtm_run.json") != json.loads(stages.dumps_json(record)):
                stages.write_json(config.run_dir / "dtm_run.json", record)  # unchanged: left untouched
        prepare = group in ("all", "prepare")
        self._stage("base", stages.base_dir(config), (), lambda: stages.base_status(config, self.hashes),
                    lambda: convert_gguf_base(config, self.hashes), prepare)
        for cell in config.cells():
            self._stage(disperse_stage(cell), stages.portions_dir(config, cell), (),
                        lambda cell=cell: stages.disperse_status(config, cell),
                        lambda cell=cell: run_disperse(config, cell), prepare)
        if group == "prepare" or self.until == "disperse":
            return self.plan
        models = evaluation.eval_models(config)
        finish = group in ("all", "finish")
        evaluate = self.until == "eval" and group != "train"
        # seed by seed: a run stopped part-way has every stage of its first seeds, a usable partial result
        jobs = config.jobs()
        for seed in config.seeds if config.seeds is not None else (None,):
            for index, job in enumerate(jobs):
                if job.cell.seed != seed or (group == "train" and index != self.job_index):
                    continue
                self._stage(job.name, stages.job_dir(config, job.name), ("base", disperse_stage(job.cell)),
                            lambda job=job: stages.train_status(config, job, self.hashes),
                            lambda job=job: run_training(config, job, self.nproc, self.hashes),
                            group in ("all", "train"))
            if group == "train" or self.until == "train":
                continue
            for cell in (c for c in config.cells() if c.seed == seed):
                for setting in config.merges:
                    name = stages.merge_stage(config, cell, setting)
                    subs = tuple(f"{cell.prefix}sub-{i}" for i in range(cell.k))
                    self._stage(name, stages.merged_dir(config, cell, setting), ("base", *subs),
                                lambda cell=cell, setting=setting: stages.merge_status(config, cell, setting,
                                                                                       self.identities),
                                lambda cell=cell, setting=setting: run_merge_stage(config, cell, setting,
                                                                                   self.identities),
                                finish)
            if evaluate:
                for model in models:
                    if model.spec.role != "base" and model.seed == seed:
                        self._eval_stage(model, finish)
        if evaluate:
            # the base last: a run stopped part-way has its first seeds' vanilla and merged scores
            for model in models:
                if model.spec.role == "base":
                    self._eval_stage(model, finish)
            self._stage("report", stages.report_dir(config), tuple(evaluation.eval_stage(m) for m in models),
                        lambda: evaluation.report_status(config, models, self.identities),
                        lambda: run_report(config, models, self.identities), finish)
        return self.plan

    def _eval_stage(self, model: evaluation.EvalModel, in_group: bool) -> None:
        config = self.config
        self._stage(evaluation.eval_stage(model), stages.eval_dir(config, model.spec.id), ("base", *model.depends_on),
                    lambda: evaluation.eval_status(config, model, self.identities, self.hashes),
                    lambda: run_eval_model(config, model, self.identities, self.hashes), in_group)


def disperse_stage(cell: Cell) -> str:
    return f"{cell.prefix}disperse"


# ---- the dry run: the grid, cheap checks of the inputs, and what the run will cost ------------------
def check_inputs(config: RunConfig) -> dict[str, int]:
    """What a dry run can check without loading a model: each data file's first record parses in
    its format, the record count is at least every K, the kmeans encoder exists. Returns the
    record count per data file."""
    from dtm_fast.data.records import conversations_of, count_records, detect_format, first_record

    counts = {}
    disperse = stages.disperse_config(config, config.cells()[0])
    for path in config.data:
        record = first_record(path)
        if record is None:
            raise DtmError(f"{config.where}: data: {path}: contains no records")
        conversations_of([record], disperse.format or detect_format(record), disperse.first_turn_only)
        counts[str(path)] = count_records(path)
    total = sum(counts.values())
    if max(config.ks) > total:
        raise DtmError(f"{config.where}: k = {max(config.ks)} is larger than the {total} records in data "
                       f"({', '.join(counts)}); lower k or add data")
    if disperse.encoder is not None and not Path(disperse.encoder).exists():
        raise DtmError(f"{config.where}: disperse.encoder: {disperse.encoder}: no such directory")
    return counts


def estimated_cost(config: RunConfig, records: int) -> list[list[str]]:
    """Rows of (what, how many, of what): training steps and rows per job kind, merges, and the
    model evaluations with their questions. Counts, not times: they hold on any machine."""
    from dtm_fast.eval.tasks import load_mmlu_jsonl

    train = stages.train_config(config, config.jobs()[0])

    def steps(rows: int) -> str:
        if train.max_steps is not None:
            return f"{train.max_steps} steps"
        # without packing: one row per record; packing only lowers it
        total = -(-int(rows * train.epochs) // train.batch_size)
        return f"≤ {total} steps ({train.epochs:g} epoch(s) of ~{rows} records, {train.batch_size} rows a step)"

    seeds = len(config.seeds) if config.seeds is not None else 1
    rows = [["grid", f"{seeds} seed(s) x K in {list(config.ks)} x {len(config.merges)} merge setting(s)",
             f"{len(config.cells())} cell(s)"]]
    for k in config.ks:
        rows.append([f"sub-model (K={k})", f"{seeds * k} job(s)", steps(records // k)])
    if config.vanilla:
        rows.append(["vanilla", f"{seeds} job(s)", steps(records)])
    rows.append(["merge", f"{len(config.cells()) * len(config.merges)} merge(s)", f"{len(config.merges)} per cell"])
    settings = evaluation.eval_config(config)
    questions = []
    for task in settings.tasks:
        if task.file:
            questions.append(f"{task.name}: {len(load_mmlu_jsonl(task.file, settings.limit))} questions")
        else:
            questions.append(f"{task.name}: {settings.limit or 'all'} questions")
    rows.append(["evaluation", f"{len(settings.models)} model(s)", ", ".join(questions)])
    return rows


def dry_run(config: RunConfig, until: str, title: str) -> list[PlannedStage]:
    counts = check_inputs(config)
    plan = Walk(config, execute=False, until=until).walk()
    show_plan(plan, title)
    ui.table("estimated cost", ["what", "count", "each"], estimated_cost(config, sum(counts.values())))
    return plan


def show_plan(plan: list[PlannedStage], title: str) -> None:
    ui.table(title, ["stage", "state", "output", "what happens"],
             [[s.name, s.state, str(s.output), s.detail] for s in plan])


# ---- the stages' work -------------------------------------------------------------------------------
def _staging_beside(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))


def convert_gguf_base(config: RunConfig, hashes: stages.HashCache) -> None:
    """De-quantise the GGUF base once into a float32 Hugging Face directory, which the trainer, the
    merger (LoRA needs the base's tensors) and the evaluation all read."""
    from transformers import AutoTokenizer

    from dtm_fast.io.owned_dir import check_replaceable, publish
    from dtm_fast.train.loading import save_dequantized_gguf

    target = stages.base_dir(config)
    check_replaceable(target, "dtm run (base)", overwrite=False, replace_own=True)
    source = config.base_model / config.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(config.base_model), gguf_file=config.gguf_file)
    except (OSError, ValueError) as error:
        raise DtmError(f"{config.where}: gguf_file: cannot load {source}: {error}") from None
    staging = _staging_beside(target)
    save_dequantized_gguf(config.base_model, config.gguf_file, staging)
    tokenizer.save_pretrained(staging)
    stages.write_json(staging / stages.BASE_MANIFEST,
                      {"tool": "dtm_fast run", "version": __version__,
                       "source": {"gguf": str(source), "sha256": hashes.sha256(source)}})
    publish(staging, target, "dtm run (base)", marker=stages.BASE_MANIFEST)


def run_disperse(config: RunConfig, cell: Cell) -> None:
    from dtm_fast.data.records import count_records
    from dtm_fast.disperse.pipeline import disperse

    disperse_config = stages.disperse_config(config, cell)
    # K against the record count here, so the error names the config's field
    count = sum(count_records(path) for path in disperse_config.inputs)
    if cell.k > count:
        raise DtmError(f"{config.where}: k = {cell.k} is larger than the {count} records in data "
                       f"({', '.join(disperse_config.inputs)}); lower k or add data")
    disperse(disperse_config)


def training_command(config: RunConfig, job: Job, nproc: int) -> list[str]:
    yaml_path = stages.train_config_path(config, job)
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                "-m", "dtm_fast.train", str(yaml_path)]
    return [sys.executable, "-m", "dtm_fast.train", str(yaml_path)]


def write_training_config(config: RunConfig, job: Job, hashes: stages.HashCache) -> Path:
    """The job's YAML. Its checkpoints go to a folder named by the job's fingerprint (settings and
    input contents), so a job resumes only checkpoints it wrote itself and none is ever deleted."""
    import yaml

    from dtm_fast.io.atomic import write_text
    from dtm_fast.train.checkpoint import complete_checkpoints

    checkpoints = stages.checkpoints_dir(config, job, stages.train_fingerprint(config, job, hashes))
    resume = bool(complete_checkpoints(checkpoints))
    path = stages.train_config_path(config, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = stages.train_config(config, job, resume=resume, checkpoint_dir=checkpoints).to_dict()
    write_text(path, f"# written by dtm run from {config.config_path}; run it with:\n"
                     f"#   python -m dtm_fast.train {path}\n" + yaml.safe_dump(values, sort_keys=False))
    return path


def run_training(config: RunConfig, job: Job, nproc: int, hashes: stages.HashCache) -> None:
    write_training_config(config, job, hashes)
    command = training_command(config, job, nproc)
    logger.info("running %s", " ".join(command))
    code = run_reporting_progress(command, job.name, stages.log_path(config))
    if code != 0:
        raise DtmError(f"training {job.name} failed (exit code {code}; its output is in {stages.log_path(config)}); "
                       "its checkpoints are kept: fix the cause and rerun dtm run to resume")


def run_reporting_progress(command: list[str], name: str, log_file: Path) -> int:
    """Run a dtm subprocess in its json UI mode: its metrics lines become our progress lines, and
    everything else it prints (library logs, warnings) goes to the run's log file."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a", encoding="utf-8") as log:
        log.write(f"--- {name}: {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                   env={**os.environ, "DTM_UI": "json"})
        assert process.stdout is not None
        for line in process.stdout:
            event = _json_event(line)
            if event is None:
                log.write(line)
            elif event.get("event") == "metrics":
                event.pop("event")
                ui.metrics({"job": name, **event})
            elif event.get("event") in ("info", "warning"):
                (ui.warn if event["event"] == "warning" else ui.info)(f"[{name}] {event.get('message', '')}")
            else:
                log.write(line)
        return process.wait()


def _json_event(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def run_merge_stage(config: RunConfig, cell: Cell, setting: MergeSetting, identities: dict[str, str]) -> None:
    from dtm_fast.io.output import partial_dir
    from dtm_fast.merge.engine import run_merge

    stage = stages.merge_stage(config, cell, setting)
    fingerprint = stages.merge_fingerprint(config, cell, setting, identities)
    record = stages.read_json(stages.state_dir(config) / f"{stage}.json")
    partial = partial_dir(stages.merged_dir(config, cell, setting))
    if partial.exists() and (not isinstance(record, dict) or record.get("fingerprint") != fingerprint):
        raise DtmError(f"{partial} holds an interrupted merge of other sub-models or settings, which cannot be "
                       f"resumed; remove it (rm -r {partial}) and rerun dtm run")
    stages.record_stage(config, stage, fingerprint, complete=False)
    run_merge(stages.merge_config(config, cell, setting, resume=partial.exists()))
    stages.record_stage(config, stage, fingerprint, complete=True)


def run_eval_model(config: RunConfig, model: evaluation.EvalModel, identities: dict[str, str],
                   hashes: stages.HashCache) -> None:
    """One model's evaluation into eval/<model>/: result.json and samples/ (lm_eval's per-sample log)."""
    from dtm_fast.eval.harness import build_tasks
    from dtm_fast.eval.pipeline import RequestCache, evaluate_model

    stage = evaluation.eval_stage(model)
    fingerprint = evaluation.eval_fingerprint(config, model, identities, hashes)
    stages.record_stage(config, stage, fingerprint, complete=False)
    settings = evaluation.eval_config(config)
    folder = stages.eval_dir(config, model.spec.id)
    with ui.library_output_to(stages.log_path(config)):
        tasks = build_tasks(settings)
        cache = RequestCache(config.run_dir / "eval" / "request-cache" /
                             stages.digest(evaluation.eval_settings_identity(config, hashes))[:16])
        sub_paths = model.spec.path.split("+") if model.spec.role == "ensemble" else None
        result = evaluate_model(model.spec, settings, tasks, folder / "samples", cache, sub_paths)
    result.update(seed=model.seed, k=model.k, merge=model.merge)
    stages.write_json(folder / evaluation.RESULT_FILE, result)
    stages.record_stage(config, stage, fingerprint, complete=True)


def run_report(config: RunConfig, models: list[evaluation.EvalModel], identities: dict[str, str]) -> None:
    from dtm_fast.eval.pipeline import finish_report

    fingerprint = evaluation.report_fingerprint(config, models, identities)
    stages.record_stage(config, "report", fingerprint, complete=False)
    results = [stages.read_json(stages.eval_dir(config, m.spec.id) / evaluation.RESULT_FILE) for m in models]
    finish_report(results, evaluation.eval_config(config))
    stages.record_stage(config, "report", fingerprint, complete=True)


def show_report(config: RunConfig) -> dict[str, Any] | None:
    from dtm_fast.eval.cli import show_report as show

    path = stages.report_dir(config) / "report.json"
    report = stages.read_json(path)
    if not isinstance(report, dict):
        return None
    show(report)
    return report
