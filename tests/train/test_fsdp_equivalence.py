"""Two gloo processes under FSDP2 compute what one process computes on the same global batch.

fp32 compute on both sides (bf16 on CPU would make the comparison loose); the tolerance reached on
these machines is about 1e-6 on weights after 4 AdamW steps (reduction order differs)."""

import json
import os
import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file


def run(tmp_path, tiny_model, data, output, processes, extra=()):
    # `--nproc-per-node N` makes the command start torchrun itself (`torchrun --standalone -m dtm_fast.train`)
    command = [sys.executable, "-m", "dtm_fast.train", "--nproc-per-node", str(processes)]
    command += ["--model", str(tiny_model), "--data", str(data), "--output_dir", str(output), "--max_length", "160",
                "--batch_size", "4", "--micro_batch_size", "1", "--max_steps", "4", "--learning_rate", "1e-3",
                "--mixed_precision", "fp32", "--seed", "5", "--quiet", *extra]
    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    # its own session, so a hung run is killed with all the ranks torchrun started
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 0, stderr[-3000:]
    return [json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_two_process_fsdp_equals_single_process(tiny_model, arithmetic_data, tmp_path):
    # activation checkpointing on in the sharded run: it must not change the numbers either
    single = run(tmp_path, tiny_model, arithmetic_data, tmp_path / "single", 1)
    sharded = run(tmp_path, tiny_model, arithmetic_data, tmp_path / "sharded", 2,
                  extra=("--activation_checkpointing", "true"))
    assert len(single) == len(sharded) == 4
    for a, b in zip(single, sharded):
        assert abs(a - b) < 1e-5, (single, sharded)
    one = load_file(tmp_path / "single" / "model-00001-of-00001.safetensors")
    two = load_file(tmp_path / "sharded" / "model-00001-of-00001.safetensors")
    assert sorted(one) == sorted(two)
    worst = max(float((one[name] - two[name]).abs().max()) for name in one)
    moved = max(float((one[name] - base).abs().max())
                for name, base in load_file(tiny_model / "model.safetensors").items())
    print(f"FSDP2 2-process vs 1-process: max weight difference {worst:.2e} (weights moved by up to {moved:.2e})")
    assert moved > 1e-3
    assert worst < 1e-5


def test_two_process_lora_equals_single_process(tiny_model, arithmetic_data, tmp_path):
    """The adapters are created on the meta device and initialised by peft on every rank: both ranks
    and the single process must start from, and reach, the same adapter."""
    lora = ("--finetuning", "lora", "--lora_r", "4", "--lora_dropout", "0", "--lora_target_modules", "[q_proj,up_proj]",
            "--learning_rate", "5e-3")
    single = run(tmp_path, tiny_model, arithmetic_data, tmp_path / "single", 1, extra=lora)
    sharded = run(tmp_path, tiny_model, arithmetic_data, tmp_path / "sharded", 2, extra=lora)
    assert all(abs(a - b) < 1e-5 for a, b in zip(single, sharded)), (single, sharded)
    one = load_file(tmp_path / "single" / "adapter_model.safetensors")
    two = load_file(tmp_path / "sharded" / "adapter_model.safetensors")
    assert sorted(one) == sorted(two) and len(one) == 8
    assert max(float((one[name] - two[name]).abs().max()) for name in one) < 1e-5


def test_checkpoint_of_two_ranks_resumes_on_one(tiny_model, arithmetic_data, tmp_path):
    """Each rank saved its own rows; one process reads every row back from both files."""
    import shutil

    saving = ("--checkpoint_every", "2")
    two_ranks = run(tmp_path, tiny_model, arithmetic_data, tmp_path / "two", 2, extra=saving)
    (tmp_path / "one.checkpoints").mkdir()
    shutil.copytree(tmp_path / "two.checkpoints" / "step-00000002", tmp_path / "one.checkpoints" / "step-00000002")
    assert sorted(p.name for p in (tmp_path / "one.checkpoints" / "step-00000002").iterdir()) == [
        "rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors", "trainer.json"]
    one_rank = run(tmp_path, tiny_model, arithmetic_data, tmp_path / "one", 1, extra=saving)
    assert len(one_rank) == 2  # steps 3 and 4: it continued from step 2
    assert all(abs(a - b) < 1e-5 for a, b in zip(one_rank, two_ranks[2:])), (one_rank, two_ranks)
