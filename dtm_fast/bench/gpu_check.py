"""The GPU check: everything of dtm_fast that only a GPU runs, in minutes, with one report.

    make gpu-check OUT=bench/results/gpu-check                  # on a CUDA machine (< 8 min on one H100/H200)
    python -m dtm_fast.bench.gpu_check OUT_DIR [--cpu-dry-run]  # the same; --cpu-dry-run: tiny sizes on CPU

It runs from a checkout of the repository (its first step runs the repository's GPU tests).

Steps, each in its own process (so one step's GPU memory or TRITON_INTERPRET never reaches the
next) and each recorded even when it fails:
    gpu-tests      the GPU-marked tests (tests/train/test_gpu.py, tests/backends), pass/fail/skip counts
    triton-merge   the Triton merge against the reference backend on the bench preset (default:
                   issue 3's 1.32 GB Llama, base + 4 fine-tunes): exactness per method (bit-identical
                   tensors, worst difference in units of the output's last place), and its GB/s of
                   input + output bytes against the host-to-device + device-to-host copy floor
                   measured in the same run (pinned buffers)
    full-finetune  a synthetic ~1.1B Llama (TinyLlama shapes) fine-tuned in bf16: flash-attention
                   when installed, else sdpa; packing; activation checkpointing; tokens/s per device
                   and MFU, medians over the steps after warm-up
    lora           the same model with LoRA (r 16 on every linear layer)
Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md. `--cpu-dry-run` runs every step at tiny
sizes on CPU (Triton through its interpreter, the copy floor as a host memcpy): it checks that the
script works, its figures mean nothing and are labelled so; tests/train/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout: dtm_fast/bench/gpu_check.py
STEPS = ("gpu-tests", "triton-merge", "full-finetune", "lora")
STEP_TIMEOUT_S = {"gpu-tests": 150, "triton-merge": 300, "full-finetune": 180, "lora": 150}
MERGE_METHODS = ("linear", "ties")
WARMUP_STEPS = 2


# ---- the orchestrator ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--cpu-dry-run", action="store_true", help="every step at tiny sizes on CPU")
    parser.add_argument("--preset", default="default", help="bench merge preset of the triton-merge step")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # one step, in this process
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.step:
        result = STEP_FUNCTIONS[args.step](args.output / "work" / args.step, args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    started = time.perf_counter()
    report = {"dry_run": args.cpu_dry_run, "environment": environment(), "steps": {}}
    for step in STEPS:
        report["steps"][step] = run_step(step, args)
        print(f"[gpu-check] {step}: {report['steps'][step]['status']} in {report['steps'][step]['seconds']:.0f} s",
              flush=True)
    report["total_s"] = round(time.perf_counter() - started, 1)
    sys.path.insert(0, str(REPO))
    from dtm_fast.io.atomic import write_json, write_text

    write_json(args.output / "gpu_check.json", report)
    write_text(args.output / "gpu_check.md", markdown(report))
    print(f"[gpu-check] {report['total_s']:.0f} s; wrote {args.output / 'gpu_check.json'} and gpu_check.md")
    return 0 if all(s["status"] == "ok" for s in report["steps"].values()) else 1


def run_step(step: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "dtm_fast.bench.gpu_check", str(args.output), "--step", step, "--preset", args.preset]
    if args.cpu_dry_run:
        command.append("--cpu-dry-run")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    if step == "triton-merge" and args.cpu_dry_run:
        env["TRITON_INTERPRET"] = "1"  # set before triton is imported: kernels run on CPU tensors
    log = args.output / f"{step}.log"
    started = time.perf_counter()
    try:
        completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO,
                                   timeout=STEP_TIMEOUT_S[step] * (3 if args.cpu_dry_run else 1))
        output, code = completed.stdout + completed.stderr, completed.returncode
    except subprocess.TimeoutExpired as expired:
        output, code = f"{expired.stdout or ''}{expired.stderr or ''}\ntimed out", None
    log.write_text(output if isinstance(output, str) else output.decode(errors="replace"))
    seconds = round(time.perf_counter() - started, 1)
    lines = [line for line in str(output).splitlines() if line.startswith("RESULT ")]
    if code == 0 and lines:
        return {"seconds": seconds, **json.loads(lines[-1][len("RESULT "):])}
    reason = "timed out" if code is None else f"exit code {code}"
    return {"status": "failed", "seconds": seconds, "reason": f"{reason}; see {log}",
            "tail": str(output)[-1500:]}


def environment() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["devices"] = torch.cuda.device_count()
    for package in ("transformers", "peft", "triton", "flash_attn"):
        try:
            from importlib.metadata import version

            info[package] = version(package.replace("_", "-"))
        except Exception:  # noqa: BLE001 - not installed
            info[package] = None
    return info


# ---- the steps (each runs in its own process) -----------------------------------------------------------
def step_gpu_tests(work: Path, args: argparse.Namespace) -> dict:
    import xml.etree.ElementTree as ElementTree

    work.mkdir(parents=True, exist_ok=True)
    report = work / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={report}",
               "tests/train/test_gpu.py", "tests/backends"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ok = completed.returncode in (0, 5) and not counts["failures"] and not counts["errors"]
    return {"status": "ok" if ok else "failed", "passed": passed, "failed": counts["failures"] + counts["errors"],
            "skipped": counts["skipped"], "summary": completed.stdout.strip().splitlines()[-1:]}


def copy_floor_gb_s(dry_run: bool, size: int) -> dict:
    """Host-to-device and device-to-host copy bandwidth of pinned buffers (a host memcpy in the dry run)."""
    import torch

    repeats = 4
    if dry_run:
        source, target = torch.empty(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
        started = time.perf_counter()
        for _ in range(repeats):
            target.copy_(source)
        memcpy = size * repeats / (time.perf_counter() - started) / 1e9
        return {"h2d_gb_s": memcpy, "d2h_gb_s": memcpy, "what": "host memcpy (dry run: no GPU)"}
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(size, dtype=torch.uint8, device="cuda")
    device.copy_(host, non_blocking=True)  # warm-up
    torch.cuda.synchronize()
    rates = {}
    for name, (dst, src) in {"h2d_gb_s": (device, host), "d2h_gb_s": (host, device)}.items():
        started = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        rates[name] = size * repeats / (time.perf_counter() - started) / 1e9
    return {**rates, "what": "pinned host <-> device copies, 4 x 1 GiB each way"}


def ulp_difference(a, b) -> int:
    """Largest difference of two same-dtype float tensors in units of the last place (via their bits)."""
    import torch

    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    x, y = a.view(bits).to(torch.int64), b.view(bits).to(torch.int64)
    # map sign-magnitude bit patterns onto a monotonic integer line
    top = 1 << (8 * a.element_size() - 1)
    x = torch.where(x < 0, -(x + top), x)
    y = torch.where(y < 0, -(y + top), y)
    return int((x - y).abs().max()) if x.numel() else 0


def step_triton_merge(work: Path, args: argparse.Namespace) -> dict:
    from safetensors import safe_open

    from dtm_fast.bench.merge_models import PRESETS, Preset, build_models, checkpoint_files
    from dtm_fast.bench.merge_runs import FLOOR_BUFFER_BYTES, model_bytes, read_files_s
    from dtm_fast.merge.backends import triton_backend
    from dtm_fast.merge.config import MergeConfig, ModelInput
    from dtm_fast.merge.engine import run_merge

    dry_run = args.cpu_dry_run
    reason = triton_backend.unavailable_reason()
    if reason:
        return {"status": "failed", "reason": f"the Triton backend cannot run: {reason}"}
    preset = Preset("dry-run", 64, 160, 1, 96, 4, 2, 1_000_000, "tiny, for --cpu-dry-run") if dry_run \
        else PRESETS[args.preset]
    base, tuned = build_models(work / "models", preset, models=4, noise=1e-3)
    inputs = [*checkpoint_files(base), *[f for path in tuned for f in checkpoint_files(path)]]
    input_bytes = sum(model_bytes(path) for path in [base, *tuned])
    page_cache_s = read_files_s(inputs, bytearray(FLOOR_BUFFER_BYTES))  # also warms the page cache
    floor = copy_floor_gb_s(dry_run, 1 << 20 if dry_run else 1 << 30)
    methods = {}
    for method in MERGE_METHODS:
        outputs = {}
        for backend in ("reference", "triton"):
            output = work / f"{method}-{backend}"
            config = MergeConfig(method=method, models=tuple(ModelInput(p) for p in tuned), output=output,
                                 base=base, parameters={"density": 0.5} if method == "ties" else {},
                                 backend=backend, overwrite=True)
            started = time.perf_counter()
            run_merge(config)
            outputs[backend] = (output, time.perf_counter() - started)
        output_bytes = model_bytes(outputs["triton"][0])
        identical = total = worst = 0
        for file in checkpoint_files(outputs["reference"][0]):
            with safe_open(str(file), "pt") as expected, safe_open(str(outputs["triton"][0] / file.name), "pt") as got:
                for name in expected.keys():
                    a, b = expected.get_tensor(name), got.get_tensor(name)
                    total += 1
                    identical += bool(a.shape == b.shape and a.dtype == b.dtype and a.equal(b))
                    worst = max(worst, ulp_difference(a, b) if a.shape == b.shape else 1 << 30)
        seconds = outputs["triton"][1]
        floor_s = input_bytes / (floor["h2d_gb_s"] * 1e9) + output_bytes / (floor["d2h_gb_s"] * 1e9)
        methods[method] = {"tensors_identical": f"{identical}/{total}", "worst_ulp": worst,
                           "exact": worst <= 1,  # DESIGN: thresholds and masks exact, values within 1 ulp
                           "triton_s": round(seconds, 3), "reference_s": round(outputs["reference"][1], 3),
                           "triton_gb_s": round((input_bytes + output_bytes) / seconds / 1e9, 3),
                           "floor_s": round(floor_s, 3), "share_of_floor": round(floor_s / seconds, 3)}
    ok = all(m["exact"] for m in methods.values())
    return {"status": "ok" if ok else "failed", "preset": preset.name, "input_bytes": input_bytes,
            "page_cache_read_gb_s": round(input_bytes / page_cache_s / 1e9, 3), "copy_floor": floor,
            "methods": methods}


def synthetic_llama(directory: Path, dry_run: bool) -> Path:
    """TinyLlama-1.1B shapes with random weights (bf16) and the byte-level chat tokenizer; tiny in the dry run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dtm_fast.train.tiny import build_tokenizer

    if (directory / "config.json").is_file():
        return directory
    tokenizer = build_tokenizer()
    shapes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2) if dry_run else dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4)
    config = LlamaConfig(vocab_size=max(len(tokenizer), 32000 if not dry_run else 0), max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False, **shapes)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def synthetic_data(path: Path, count: int, most_words: int) -> Path:
    """Alpaca records of 1/5 to all of `most_words` words each way, so packing has lengths to fit."""
    import random

    rng = random.Random(0)
    vocabulary = ["model", "merge", "train", "token", "layer", "weight", "data", "portion", "loss", "shard"]
    with open(path, "w") as handle:
        for index in range(count):
            text = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(most_words // 5, most_words)))
            handle.write(json.dumps({"instruction": f"Summarise note {index}: {text}", "output": text[::-1]}) + "\n")
    return path


def train_step_figures(work: Path, dry_run: bool, finetuning: str) -> dict:
    import torch

    from dtm_fast import ui
    from dtm_fast.train.config import TrainConfig
    from dtm_fast.train.loop import Trainer
    from dtm_fast.train.parallel import init_runtime

    ui.configure(quiet=True)
    work.mkdir(parents=True, exist_ok=True)
    model = synthetic_llama(work.parent / "llama-1b", dry_run)
    steps = 4 if dry_run else 12
    data = synthetic_data(work / "data.jsonl", 40 if dry_run else 900, 8 if dry_run else 100)
    config = TrainConfig(
        model=str(model), data=(str(data),), output_dir=str(work / "out"), finetuning=finetuning,
        lora_r=16, lora_alpha=32, lora_dropout=0.0,
        lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        learning_rate=1e-4 if finetuning == "lora" else 1e-5, max_steps=steps, warmup_ratio=0.0,
        batch_size=4 if dry_run else 16, micro_batch_size=2 if dry_run else 8, max_length=160 if dry_run else 2048,
        packing=True, activation_checkpointing=True, mixed_precision="fp32" if dry_run else "bf16",
        attention="auto", fresh=True)
    trainer = Trainer(config, init_runtime())
    trainer.build()
    trainer.describe()
    trainer.train()
    records = trainer.metrics_log.read()
    measured = records[WARMUP_STEPS:] or records
    mfu_values = [r["mfu"] for r in measured if r.get("mfu") is not None]
    figures = {
        "status": "ok", "attention": trainer.attention, "compute": str(trainer.param_dtype).replace("torch.", ""),
        "parameters": trainer.total_parameters, "trainable": trainer.trainable, "steps": len(records),
        "tokens_per_step": config.batch_size * config.max_length,
        "tokens_per_s_per_device": round(statistics.median(r["tokens_per_s_per_device"] for r in measured), 1),
        "mfu": round(statistics.median(mfu_values), 4) if mfu_values else None,
        "mfu_basis": trainer.peak_source, "loss_first_last": [records[0]["loss"], records[-1]["loss"]],
    }
    if torch.cuda.is_available():
        figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return figures


def step_full_finetune(work: Path, args: argparse.Namespace) -> dict:
    return train_step_figures(work, args.cpu_dry_run, "full")


def step_lora(work: Path, args: argparse.Namespace) -> dict:
    return train_step_figures(work, args.cpu_dry_run, "lora")


STEP_FUNCTIONS = {"gpu-tests": step_gpu_tests, "triton-merge": step_triton_merge,
                  "full-finetune": step_full_finetune, "lora": step_lora}


# ---- the report -----------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# dtm_fast GPU check{' (CPU DRY RUN: tiny sizes, the figures mean nothing)' if report['dry_run'] else ''}",
             "", f"Device: {env.get('device', 'none (CPU)')}; torch {env['torch']}, transformers {env['transformers']}, "
             f"peft {env['peft']}, triton {env['triton']}, flash-attn {env['flash_attn']}; {report['total_s']:.0f} s in all.",
             "", "| step | status | figures | seconds |", "| --- | --- | --- | --- |"]
    for name, step in report["steps"].items():
        lines.append(f"| {name} | {step['status']} | {figures_text(name, step)} | {step['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def figures_text(name: str, step: dict) -> str:
    if step["status"] != "ok" and "reason" in step:
        return step["reason"]
    if name == "gpu-tests":
        return f"{step['passed']} passed, {step['failed']} failed, {step['skipped']} skipped"
    if name == "triton-merge":
        floor = step["copy_floor"]
        parts = [f"preset {step['preset']}; copy floor {floor['h2d_gb_s']:.1f} GB/s in, {floor['d2h_gb_s']:.1f} "
                 f"GB/s out ({floor['what']})"]
        for method, m in step["methods"].items():
            parts.append(f"{method}: {m['tensors_identical']} tensors bit-identical to reference, worst {m['worst_ulp']} "
                         f"ulp; {m['triton_gb_s']:.2f} GB/s = {m['share_of_floor']:.0%} of the copy floor")
        return "; ".join(parts)
    mfu = f"MFU {step['mfu']:.1%}" if step.get("mfu") is not None else f"MFU not reported ({step['mfu_basis']})"
    return (f"{step['parameters']:,} parameters ({step['trainable']:,} trained), {step['attention']}, {step['compute']}: "
            f"{step['tokens_per_s_per_device']:,.0f} tokens/s per device, {mfu}"
            + (f", peak {step['peak_memory_gib']} GiB" if "peak_memory_gib" in step else ""))


if __name__ == "__main__":
    sys.exit(main())
