"""Fault injection: a training killed with SIGKILL at a seeded random point (inside an optimizer
step, in the middle of writing a checkpoint's tensors, between a checkpoint's tensors and its
record, during the export) and then rerun with the same command ends with exactly the weights and
the loss curve of a run that was never interrupted."""

import json
import os
import random
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# the command runs in a fresh interpreter that dies (SIGKILL: no handler, no cleanup) at the
# count-th call of the chosen function
KILLING_RUN = """
import os, signal, sys
import torch
import dtm_fast.train.checkpoint as checkpoint
import dtm_fast.train.export as export
import dtm_fast.train.tensor_rows as tensor_rows
from dtm_fast.cli import main

target, count = sys.argv[1], int(sys.argv[2])
calls = [0]

def dying(original):
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    return wrapper

if target == "optimizer-step":
    torch.optim.AdamW.step = dying(torch.optim.AdamW.step)
elif target == "checkpoint-tensor-write":
    tensor_rows.write_exact = dying(tensor_rows.write_exact)
elif target == "checkpoint-record":
    checkpoint.write_json = dying(checkpoint.write_json)
elif target == "export":
    export.write_safetensors = dying(export.write_safetensors)
sys.exit(main(sys.argv[3:]))
"""
# target -> the calls the seeded draw picks from: after the first checkpoint (step 2, 86 tensor
# writes per checkpoint of this model), so the rerun has something to continue from
TARGETS = {"optimizer-step": (3, 8), "checkpoint-tensor-write": (87, 258), "checkpoint-record": (2, 3),
           "export": (1, 1)}


def command(model, data, output):
    return ["train", "--model", str(model), "--data", str(data), "--output_dir", str(output), "--max_steps", "8",
            "--checkpoint_every", "2", "--batch_size", "4", "--max_length", "160", "--learning_rate", "1e-3",
            "--mixed_precision", "fp32", "--seed", "5", "--quiet"]


def run(args, kill=None):
    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    if kill is None:
        launch = [sys.executable, "-m", "dtm_fast.cli", *args]
    else:
        launch = [sys.executable, "-c", KILLING_RUN, kill[0], str(kill[1]), *args]
    return subprocess.run(launch, capture_output=True, text=True, env=environment, timeout=600)


def outcome(output):
    losses = [json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    return losses, load_file(output / "model-00001-of-00001.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, arithmetic_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("reference") / "sub-0"
    result = run(command(tiny_model, arithmetic_data, output))
    assert result.returncode == 0, result.stderr[-2000:]
    return outcome(output)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_killed_training_resumes_to_the_uninterrupted_result(target, uninterrupted, tiny_model, arithmetic_data,
                                                             tmp_path):
    count = random.Random(f"fault:{target}").randint(*TARGETS[target])
    output = tmp_path / "sub-0"
    killed = run(command(tiny_model, arithmetic_data, output), kill=(target, count))
    assert killed.returncode == -signal.SIGKILL, (target, count, killed.returncode, killed.stderr[-2000:])
    assert not output.exists() or not (output / "dtm_train.json").exists()

    rerun = run(command(tiny_model, arithmetic_data, output))  # the same command, nothing else
    assert rerun.returncode == 0, (target, count, rerun.stderr[-2000:])
    losses, weights = outcome(output)
    expected_losses, expected_weights = uninterrupted
    assert losses == expected_losses, (target, count)
    assert sorted(weights) == sorted(expected_weights)
    for name, tensor in expected_weights.items():
        assert weights[name].equal(tensor), (target, count, name)
    assert "continuing from the checkpoint of step" in rerun.stderr, (target, count)
    print(f"killed at {target} call {count}; the rerun continued, losses and weights bit-identical")
