"""The trainer: init, build, train, export, close.

Loss is the mean over every response token of the global batch (all micro-batches of all ranks),
so a run on N ranks computes the same gradient as one process on the same batch: each rank scales
its summed token losses by world_size / (response tokens in the global batch) and FSDP averages.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtm_fast import ui
from dtm_fast.errors import Interrupted
from dtm_fast.data.chat import TokenizedExample, TokenizeReport, tokenize_conversations
from dtm_fast.data.packing import RowSchedule, collate, collate_flat, pack_rows
from dtm_fast.data.records import load_conversations
from dtm_fast.train import checkpoint as checkpoints
from dtm_fast.train import export as exporting
from dtm_fast.train.config import TrainConfig
from dtm_fast.train.fisher import estimate_fisher
from dtm_fast.train.manifest import MANIFEST_NAME, build_manifest, describe_inputs
from dtm_fast.train.metrics import MetricsLog, plot_loss
from dtm_fast.train.loading import build_sharded
from dtm_fast.train.model import (decoder_layers, load_tokenizer, parameter_count, select_attention,
                                  uses_varlen_batches)
from dtm_fast.train.optim import build_optimizer
from dtm_fast.train.plan import check_fits
from dtm_fast.train.throughput import device_peak, flop_model, mfu
from dtm_fast.train.parallel import (Runtime, all_reduce_sum, autocast, barrier, close_runtime, compute_dtype,
                                     init_runtime)
from dtm_fast.train.preflight import TOOL, check_inputs_and_outputs
from dtm_fast.train.resume import choose_checkpoint, run_identity

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # per step trained in this process
    data_report: TokenizeReport | None = None
    non_padding_share: float = 0.0
    tokens_per_s: float = 0.0


def prepare_data(config: TrainConfig, tokenizer: Any) -> tuple[list[TokenizedExample], list[list[int]], TokenizeReport]:
    conversations = load_conversations(list(config.data), fmt=config.data_format,
                                       first_turn_only=config.first_turn_only)
    examples, report = tokenize_conversations(tokenizer, conversations, config.chat_template,
                                              config.max_length, config.overlong)
    rows = pack_rows([len(e) for e in examples], config.max_length, config.seed, config.packing)
    return examples, rows, report


def _memory_in_use(runtime: Runtime) -> int:
    import torch

    if runtime.device.type == "cuda":
        return torch.cuda.max_memory_allocated(runtime.device)
    import psutil

    return psutil.Process().memory_info().rss


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, config: TrainConfig, runtime: Runtime):
        self.config = config
        self.runtime = runtime

    # ---- build ------------------------------------------------------------------------------
    def build(self) -> None:
        config, runtime = self.config, self.runtime
        check_inputs_and_outputs(config)
        self.grad_accumulation = config.gradient_accumulation(runtime.world_size)
        self.identity = run_identity(config)
        self.resume_from = choose_checkpoint(config, self.identity)
        if config.fresh and runtime.is_main:
            removed = checkpoints.remove_checkpoints(config.checkpoints_path)
            if removed:
                ui.info(f"fresh start: removed the checkpoints of steps {', '.join(map(str, removed))} in "
                        f"{config.checkpoints_path}")
        barrier(runtime)
        self.last_checkpoint = self.resume_from[0] if self.resume_from else None
        self.attention = select_attention(config.attention, runtime.device.type)
        self.param_dtype = compute_dtype(config.mixed_precision, runtime.device.type)
        self.plan = check_fits(config, runtime.world_size, runtime.device.type, runtime.local_world_size)
        _seed_everything(config.seed)
        self.tokenizer = load_tokenizer(config)
        self.examples, self.rows, self.report = prepare_data(config, self.tokenizer)
        self.schedule = RowSchedule(len(self.rows), config.batch_size, config.seed)
        self.total_steps = config.max_steps or self.schedule.total_steps(config.epochs)

        self.model, self.export_dtype = build_sharded(config, self.attention, runtime, self.param_dtype)
        self.trainable = parameter_count(self.model, trainable_only=True)
        self.total_parameters = parameter_count(self.model)
        self.model.train()
        self.optimizer, self.scheduler = build_optimizer(self.model, config, self.total_steps, runtime.device.type)
        self.flops = flop_model(self.model, len(decoder_layers(self.model)))
        self.peak_flops, self.peak_source = device_peak(runtime.device, self.param_dtype, config.peak_tflops)
        self.metrics_log = MetricsLog(config.checkpoints_path / "metrics.jsonl", runtime.is_main)

    def describe(self) -> None:
        config, report = self.config, self.report
        ui.info(f"dtm train: {config.finetuning} fine-tuning of {config.model} on {self.runtime.world_size} "
                f"rank(s), {self.runtime.device.type}, attention {self.attention}, compute "
                f"{str(self.param_dtype).replace('torch.', '')}, {self.trainable:,} of "
                f"{self.total_parameters:,} parameters trained")
        ui.info(f"data: {report.examples} examples, {report.tokens:,} tokens ({report.response_tokens:,} in "
                f"responses) in {len(self.rows)} rows of <= {config.max_length} tokens"
                f"{' (packed)' if config.packing else ''}; {self.total_steps} steps of {config.batch_size} rows "
                f"({self.grad_accumulation} micro-batch(es) of {config.micro_batch_size} per rank per step)")
        ui.info(f"MFU against {self.peak_source} per device" if self.peak_flops else f"MFU not reported: "
                f"{self.peak_source}")
        if report.truncated:
            ui.warn(f"{report.truncated} example(s) longer than max_length {config.max_length} were truncated")
        if report.dropped_too_long:
            ui.warn(f"{report.dropped_too_long} example(s) longer than max_length {config.max_length} were dropped")
        if report.dropped_no_response:
            ui.warn(f"{report.dropped_no_response} example(s) had no response token within max_length and "
                    "were dropped")

    # ---- train ------------------------------------------------------------------------------
    def _micro_batches(self, step: int) -> list[Any]:
        config, runtime = self.config, self.runtime
        global_rows = self.schedule.rows_for_step(step)
        per_rank = config.batch_size // runtime.world_size
        mine = global_rows[runtime.rank * per_rank:(runtime.rank + 1) * per_rank]
        micro = [[self.rows[i] for i in mine[start:start + config.micro_batch_size]]
                 for start in range(0, len(mine), config.micro_batch_size)]
        if uses_varlen_batches(self.attention):
            return [collate_flat(self.examples, rows) for rows in micro]
        return [collate(self.examples, rows, self.tokenizer.pad_token_id) for rows in micro]

    def _sequence_lengths(self, step: int) -> list[int]:
        """Every example's length in the global batch of `step` (all ranks), for its FLOPs."""
        return [len(self.examples[index]) for row in self.schedule.rows_for_step(step) for index in self.rows[row]]

    def train_step(self, step: int) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        runtime, device = self.runtime, self.runtime.device
        batches = self._micro_batches(step)
        local_targets = sum(int((b.targets != -100).sum()) for b in batches)
        global_targets, real, padded = all_reduce_sum(
            [local_targets, sum(b.real_tokens for b in batches), sum(b.padded_tokens for b in batches)], runtime)
        scale = runtime.world_size / global_targets
        loss_sum = 0.0
        for batch in batches:
            with autocast(runtime, self.param_dtype):
                logits = self.model(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                                    use_cache=False, **batch.attention_kwargs(device)).logits  # (rows, length, vocab)
            token_loss = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.to(device).flatten(),
                                         ignore_index=-100, reduction="sum")
            (token_loss * scale).backward()
            loss_sum += float(token_loss.detach())
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.config.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        (global_loss,) = all_reduce_sum([loss_sum], runtime)
        return {"loss": global_loss / global_targets, "lr": lr, "grad_norm": float(grad_norm),
                "tokens": real, "padded_tokens": padded}

    def train(self) -> TrainResult:
        config, runtime = self.config, self.runtime
        start_step = 0
        if self.resume_from is not None:
            start_step = checkpoints.load_checkpoint(self.resume_from[1], self.model, self.optimizer,
                                                     self.scheduler, runtime)
            ui.info(f"continuing from the checkpoint of step {start_step} ({self.resume_from[1]})")
        self.metrics_log.start(start_step)
        result = TrainResult(Path(config.output_dir), self.total_steps, data_report=self.report)
        started = time.perf_counter()
        real_total = padded_total = 0
        with ui.stage("train", total=self.total_steps, unit="steps") as progress:
            if start_step:
                progress.advance(start_step)
            for step in range(start_step, self.total_steps):
                step_started = time.perf_counter()
                record = self.train_step(step)
                elapsed = time.perf_counter() - step_started
                real_total += record["tokens"]
                padded_total += record["padded_tokens"]
                result.losses.append(record["loss"])
                step_flops = self.flops.step_flops(self._sequence_lengths(step))
                utilisation = mfu(step_flops, elapsed, runtime.world_size, self.peak_flops)
                line = {"step": step + 1, "loss": record["loss"], "lr": record["lr"],
                        "grad_norm": record["grad_norm"], "tokens_per_s": record["tokens"] / elapsed,
                        "tokens_per_s_per_device": record["tokens"] / elapsed / runtime.world_size,
                        "mfu": round(utilisation, 4) if utilisation is not None else None,
                        "epoch": round(self.schedule.epoch_at(step + 1), 4),
                        "memory_mib": round(_memory_in_use(runtime) / 2**20, 1)}
                self.metrics_log.append(line)
                progress.advance(1, loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{line['tokens_per_s']:.0f}", memory=line["memory_mib"] * 2**20)
                if (step + 1) % config.log_every == 0 and ui.mode() != "rich":
                    ui.metrics(line)
                if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 \
                        and step + 1 < self.total_steps:
                    checkpoints.save_checkpoint(config.checkpoints_path, step + 1, self.model, self.optimizer,
                                                self.scheduler, runtime, config.keep_checkpoints, self.identity)
                    self.last_checkpoint = step + 1
        wall = time.perf_counter() - started
        result.non_padding_share = real_total / padded_total if padded_total else 0.0
        result.tokens_per_s = real_total / wall if wall > 0 else 0.0
        return result

    # ---- export -----------------------------------------------------------------------------
    def export(self, result: TrainResult) -> None:
        config, runtime = self.config, self.runtime
        output = Path(config.output_dir)
        base_dir = Path(config.model)
        fisher_entries = None
        if config.fisher_samples:
            count = min(config.fisher_samples, len(self.examples))
            indices = list(range(len(self.examples)))
            random.Random(f"fisher:{config.seed}").shuffle(indices)
            ui.info(f"estimating the diagonal Fisher on {count} examples")
            fisher_entries = estimate_fisher(self.model, self.examples, indices[:count], runtime,
                                             self.tokenizer.pad_token_id,
                                             functools.partial(autocast, runtime, self.param_dtype),
                                             lora=config.finetuning == "lora")
        with exporting.StagingDir(output, runtime, TOOL, MANIFEST_NAME) as staging:
            if config.finetuning == "lora":
                exporting.write_adapter(staging, self.model, runtime, base_dir)
                if runtime.is_main:
                    self.tokenizer.save_pretrained(staging)
            else:
                exporting.write_hf_weights(staging, self.model, self.export_dtype,
                                           int(config.max_shard_size_mb * 1_000_000), runtime)
                if runtime.is_main:
                    exporting.write_hf_metadata(staging, self.model, self.tokenizer, self.export_dtype, base_dir)
            if fisher_entries is not None:
                exporting.write_safetensors(staging / "fisher.safetensors", fisher_entries, "float32", runtime,
                                            metadata={"samples": str(min(config.fisher_samples, len(self.examples)))})
            if runtime.is_main:
                self._write_records(staging, result)
        ui.info(f"exported {'LoRA adapter' if config.finetuning == 'lora' else 'model'} to {output}")

    def _write_records(self, staging: Path, result: TrainResult) -> None:
        config = self.config
        records = self.metrics_log.read()
        exporting.copy_files(staging, [self.metrics_log.path])
        if records:
            plot_loss(records, staging / "loss.png", f"{Path(config.output_dir).name}: training loss")
        report = self.report
        manifest = build_manifest(
            config.to_dict(),
            describe_inputs(Path(config.model), config.gguf_file, list(config.data), self.identity["data_sha256"]),
            {"kind": "lora_adapter" if config.finetuning == "lora" else "hf_model", "steps": self.total_steps,
             "final_loss": records[-1]["loss"] if records else None, "world_size": self.runtime.world_size,
             "examples": report.examples, "truncated": report.truncated,
             "dropped_too_long": report.dropped_too_long, "dropped_no_response": report.dropped_no_response,
             "tokens": report.tokens, "response_tokens": report.response_tokens, "rows": len(self.rows),
             "export_dtype": self.export_dtype, "attention": self.attention})
        exporting.write_json(staging / MANIFEST_NAME, manifest)


    def interrupted_message(self) -> str:
        """What the user does after Ctrl-C or SIGTERM, in exact words."""
        directory = self.config.checkpoints_path
        if self.last_checkpoint:
            return (f"the last checkpoint (step {self.last_checkpoint}) is kept in {directory}; rerun the same command "
                    "to continue from it (add --fresh to start over instead)")
        if self.config.checkpoint_every:
            return (f"no checkpoint was written yet (the first comes at step {self.config.checkpoint_every}); "
                    "rerunning the same command starts from step 0")
        return "no checkpoint was written (checkpoint_every is 0); rerunning the same command starts from step 0"


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (what torchrun, SLURM and `kill` send) ends the run like Ctrl-C: with the message that
    says how to continue, instead of dying mid-sentence."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(config: TrainConfig) -> TrainResult:
    """Run one training job in this process (one rank of it under torchrun)."""
    config.require_paths()
    runtime = init_runtime()
    trainer = Trainer(config, runtime)
    try:
        with sigterm_as_interrupt():
            trainer.build()
            trainer.describe()
            result = trainer.train()
            barrier(runtime)
            trainer.export(result)
        if result.tokens_per_s:
            ui.info(f"trained {len(result.losses)} steps at {result.tokens_per_s:,.0f} tokens/s; non-padding "
                    f"share {result.non_padding_share:.1%}")
        return result
    except KeyboardInterrupt:
        if not hasattr(trainer, "last_checkpoint"):  # interrupted before the checkpoints were looked at
            raise Interrupted("nothing was trained yet; rerun the same command to start") from None
        raise Interrupted(trainer.interrupted_message()) from None
    finally:
        close_runtime(runtime)
