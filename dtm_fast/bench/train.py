"""`dtm bench train`: training throughput of dtm_fast's trainer against transformers' Trainer.

    dtm bench train --output bench/results/train

The same tiny Llama (byte-level tokenizer, ChatML), the same synthetic conversations of long-tailed
lengths, tokenised once by dtm_fast.data.chat (identical token ids and response masks for every
contender), the same optimizer settings and one pass over the same examples. Measured: response-
and-prompt tokens trained per second (padding excluded) and the share of non-padding tokens among
those computed. Contenders:
- dtm train, packed rows (the default);
- dtm train without packing (padded batches of examples, as many per step as the HF Trainer);
- transformers.Trainer with DataCollatorForSeq2Seq (pads each batch to its longest example).
Each runs `--repeats` times; the table shows medians. On CUDA the compute is bf16 and MFU is added.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="bench/results/train", help="directory for results.json and the plot")
    parser.add_argument("--repeats", type=int, default=3, help="runs per contender (medians are reported)")
    parser.add_argument("--examples", type=int, default=128, help="synthetic conversations (one pass)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows (dtm) / examples (HF) per optimizer step")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--json", action="store_true")


def write_conversations(path: Path, count: int, seed: int) -> None:
    """Conversations whose lengths spread like instruction data: many short, a long tail."""
    rng = random.Random(seed)
    words = ("the model learns to answer questions about numbers words and code with short clear "
             "sentences while the data mixes many topics and lengths").split()

    def text(mean_words: float) -> str:
        return " ".join(rng.choice(words) for _ in range(max(1, int(rng.expovariate(1 / mean_words)))))

    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(count):
            handle.write(json.dumps({"instruction": text(12), "output": text(30)}) + "\n")


def run_dtm(model_dir: Path, data: Path, args: argparse.Namespace, packing: bool, work: Path) -> dict[str, float]:
    from dtm_fast.train.config import TrainConfig
    from dtm_fast.train.loop import Trainer
    from dtm_fast.train.parallel import init_runtime

    config = TrainConfig(model=str(model_dir), data=(str(data),), output_dir=str(work / "out"),
                         max_length=args.max_length, batch_size=args.batch_size, micro_batch_size=args.batch_size,
                         epochs=1.0, packing=packing, learning_rate=1e-4, warmup_ratio=0.0, max_grad_norm=1.0,
                         activation_checkpointing=False, seed=args.seed, checkpoint_dir=str(work / "ckpt"),
                         log_every=1_000_000)  # no per-step lines between the measurements
    trainer = Trainer(config, init_runtime())
    trainer.build()
    result = trainer.train()
    return {"tokens_per_s": result.tokens_per_s, "non_padding_share": result.non_padding_share,
            "steps": trainer.total_steps, "final_loss": result.losses[-1], "parameters": trainer.total_parameters}


def run_hf_trainer(model_dir: Path, data: Path, args: argparse.Namespace, work: Path) -> dict[str, float]:
    import torch
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, PrinterCallback, Trainer,
                              TrainerCallback, TrainingArguments)

    from dtm_fast.train.config import TrainConfig
    from dtm_fast.train.loop import prepare_data
    from dtm_fast.train.model import load_tokenizer

    config = TrainConfig(model=str(model_dir), data=(str(data),), output_dir=str(work), max_length=args.max_length,
                         packing=False, seed=args.seed)
    tokenizer = load_tokenizer(config)
    examples, _, _ = prepare_data(config, tokenizer)
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    counts = {"real": 0, "padded": 0, "started": 0.0, "ended": 0.0, "loss": float("nan")}

    def counting_collator(features):
        batch = collator(features)
        counts["real"] += int(batch["attention_mask"].sum())
        counts["padded"] += batch["attention_mask"].numel()
        return batch

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            counts["started"] = time.perf_counter()

        def on_train_end(self, *_, **__):
            counts["ended"] = time.perf_counter()

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                counts["loss"] = logs["loss"]

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    training_args = TrainingArguments(
        output_dir=str(work / "hf"), per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
        optim="adamw_torch_fused" if cuda else "adamw_torch", bf16=cuda, logging_steps=1, save_strategy="no",
        report_to=[], seed=args.seed, dataloader_num_workers=0, disable_tqdm=True, use_cpu=not cuda)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=counting_collator,
                      callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # its per-step dicts would interleave with the table
    output = trainer.train()
    wall = counts["ended"] - counts["started"]
    return {"tokens_per_s": counts["real"] / wall, "non_padding_share": counts["real"] / counts["padded"],
            "steps": output.global_step, "final_loss": counts["loss"],
            "parameters": sum(p.numel() for p in model.parameters())}


def _mfu(tokens_per_s: float, parameters: int) -> float | None:
    """The bench's rough MFU (6 x parameters per token) against the trainer's datasheet peaks."""
    import torch

    from dtm_fast.train.throughput import device_peak

    if not torch.cuda.is_available():
        return None
    peak, _ = device_peak(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16, None)
    return 6 * parameters * tokens_per_s / peak if peak else None


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [row["contender"] for row in rows]
    left.barh(names, [row["tokens_per_s"] for row in rows], color="#4c72b0")
    left.set_xlabel("non-padding tokens / s (median)")
    right.barh(names, [100 * row["non_padding_share"] for row in rows], color="#55a868")
    right.set_xlabel("non-padding share of computed tokens (%)")
    right.set_xlim(0, 100)
    right.set_yticks([])
    figure.suptitle("dtm bench train")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(args: argparse.Namespace) -> int:
    import platform

    import torch

    from dtm_fast import ui
    from dtm_fast.train.tiny import write_tiny_llama

    ui.configure(json_output=args.json, quiet=True)  # the trainers' own progress stays quiet
    import transformers

    transformers.logging.set_verbosity_error()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    contenders = {"dtm train (packed)": [], "dtm train (no packing)": [], "transformers Trainer": []}
    with tempfile.TemporaryDirectory(prefix="dtm-bench-train-") as scratch:
        scratch_path = Path(scratch)
        model_dir = write_tiny_llama(scratch_path / "model", hidden_size=args.hidden_size, layers=args.layers,
                                     heads=max(2, args.hidden_size // 64))
        data = scratch_path / "conversations.jsonl"
        write_conversations(data, args.examples, args.seed)
        for repeat in range(args.repeats):
            # interleaved, so a slow phase of a shared machine hits every contender alike
            for name in contenders:
                work = scratch_path / f"run-{repeat}-{len(contenders[name])}-{name.split()[0]}"
                if name == "transformers Trainer":
                    measured = run_hf_trainer(model_dir, data, args, work)
                else:
                    measured = run_dtm(model_dir, data, args, packing="no packing" not in name, work=work)
                contenders[name].append(measured)
                ui.info(f"[{repeat + 1}/{args.repeats}] {name}: {measured['tokens_per_s']:,.0f} tokens/s, "
                        f"non-padding {measured['non_padding_share']:.1%}")
    rows = []
    for name, runs in contenders.items():
        tokens_per_s = statistics.median(r["tokens_per_s"] for r in runs)
        rows.append({"contender": name, "tokens_per_s": tokens_per_s,
                     "non_padding_share": statistics.median(r["non_padding_share"] for r in runs),
                     "steps": runs[0]["steps"], "final_loss": statistics.median(r["final_loss"] for r in runs),
                     "mfu": _mfu(tokens_per_s, runs[0]["parameters"]), "runs": runs})
    baseline = rows[-1]["tokens_per_s"]
    columns = ["contender", "tokens/s (median)", "vs Trainer", "non-padding", "steps", "final loss"]
    if any(row["mfu"] is not None for row in rows):
        columns.append("MFU")
    table_rows = []
    for row in rows:
        cells = [row["contender"], f"{row['tokens_per_s']:,.0f}", f"{row['tokens_per_s'] / baseline:.2f}x",
                 f"{row['non_padding_share']:.1%}", row["steps"], f"{row['final_loss']:.3f}"]
        if "MFU" in columns:
            cells.append(f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a")
        table_rows.append(cells)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    title = (f"dtm bench train: Llama hidden {args.hidden_size} x {args.layers} layers, {args.examples} examples, "
             f"batch {args.batch_size}, max length {args.max_length}, {device}")
    ui.table(title, columns, table_rows)
    setup = {key: value for key, value in vars(args).items() if not key.startswith("_") and key not in ("json", "quiet")}
    result = {"benchmark": "train", "device": device, "platform": platform.platform(), "torch": torch.__version__,
              "transformers": transformers.__version__, "settings": setup, "results": rows}
    (output / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(rows, output / "train_bench.png")
    ui.info(f"wrote {output / 'results.json'} and {output / 'train_bench.png'}")
    return 0
