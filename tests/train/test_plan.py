"""The memory plan (issue 11.2): its parameter, gradient and optimizer figures against the bytes a
real 2-rank CPU run allocates, its arithmetic against transformers' own parameter count, and its
refusals naming the fix."""

import json
import os
import subprocess
import sys

import pytest

from tests.train.conftest import assert_one_line_error, dtm_train

LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
             "torch_dtype": "float16", "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def llama2_7b_config(tmp_path_factory):
    """Only config.json: the plan reads nothing else."""
    directory = tmp_path_factory.mktemp("llama2-7b")
    (directory / "config.json").write_text(json.dumps(LLAMA2_7B))
    return directory


def plan_args(model, *extra):
    return ["train", "--plan", "--model", str(model), "--data", "unused.jsonl", "--output_dir", "unused", "--quiet",
            *map(str, extra)]


def test_parameter_counts_are_transformers_counts(llama2_7b_config):
    from transformers import AutoConfig, AutoModelForCausalLM
    from accelerate import init_empty_weights

    from dtm_fast.train.config import TrainConfig
    from dtm_fast.train.plan import describe_architecture, plan_memory

    with init_empty_weights():
        reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(llama2_7b_config))
    total = reference.num_parameters()
    assert total == 6_738_415_616  # Llama-2-7B's published count
    config = TrainConfig(model=str(llama2_7b_config), mixed_precision="bf16")
    arch = describe_architecture(config)
    assert arch.parameters == total and arch.layers == 32
    # LoRA r=16 on gate/up/down: 32 layers x 16 x ((4096 + 11008) x 2 + (11008 + 4096))
    assert arch.lora_trainable == 32 * 16 * 3 * (4096 + 11008)
    plan = plan_memory(arch, config, 8, "cuda", 80 * 10**9, "test", 2)
    assert plan.parts["parameters (fp32 master, sharded)"] == 4 * total / 8
    assert plan.parts["optimizer (AdamW moments, sharded)"] == 8 * total / 8
    assert plan.fits


def test_a_config_that_cannot_fit_is_refused_naming_the_fixes(llama2_7b_config, capsys):
    code, err = dtm_train(capsys, *plan_args(llama2_7b_config, "--nproc-per-node", "1", "--gpu-memory", "80GB"))
    line = assert_one_line_error(code, err, "this run needs about")
    assert "on 1 rank(s) and --gpu-memory has 74.51 GiB" in line
    assert "use 2 ranks or more (--nproc-per-node 2)" in line and "finetuning: lora (trains 23,199,744 instead" in line
    code, err = dtm_train(capsys, *plan_args(llama2_7b_config, "--nproc-per-node", "8", "--gpu-memory", "80GB",
                                             "--activation_checkpointing", "false", "--micro_batch_size", "16",
                                             "--batch_size", "128"))
    line = assert_one_line_error(code, err, "set activation_checkpointing: true")
    assert "lower micro_batch_size to" in line
    code, err = dtm_train(capsys, *plan_args(llama2_7b_config, "--nproc-per-node", "8", "--gpu-memory", "80GB"))
    assert code == 0, err
    assert "fits:" in err
    code, err = dtm_train(capsys, *plan_args(llama2_7b_config, "--gpu-memory", "inf"))
    assert_one_line_error(code, err, "--gpu-memory")


# one rank of a real run, one step: bytes actually allocated for parameters, gradients and AdamW state
MEASURE = """
import json, sys, torch
from dtm_fast.train.config import TrainConfig
from dtm_fast.train.loop import Trainer
from dtm_fast.train.parallel import autocast, init_runtime
from dtm_fast import ui
from torch.distributed.tensor import DTensor

ui.configure(quiet=True)
values = json.loads(sys.argv[1])
runtime = init_runtime()
trainer = Trainer(TrainConfig(**values), runtime)
trainer.build()
batch = trainer._micro_batches(0)[0]
logits = trainer.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=-100).backward()
trainer.optimizer.step()

def allocated(tensors):
    # by storage: FSDP2 keeps a layer's sharded gradients as views of one reduce-scatter buffer
    storages = {}
    for tensor in tensors:
        storage = (tensor.to_local() if isinstance(tensor, DTensor) else tensor).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())

params = allocated(trainer.model.parameters())
grads = allocated(p.grad for p in trainer.model.parameters() if p.grad is not None)
states = allocated(v for state in trainer.optimizer.state.values() for v in state.values() if v.dim() > 0)
# one file per rank: two ranks printing to one pipe can interleave their lines
with open(f"{sys.argv[2]}/rank-{runtime.rank}.json", "w") as handle:
    json.dump({"rank": runtime.rank, "params": params, "grads": grads, "optimizer": states}, handle)
"""


@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_plan_matches_a_measured_two_rank_cpu_run(tmp_path, arithmetic_data, finetuning):
    from dtm_fast.train.config import TrainConfig
    from dtm_fast.train.plan import describe_architecture, plan_memory
    from dtm_fast.train.tiny import write_tiny_llama

    model = write_tiny_llama(tmp_path / "base", hidden_size=128, layers=4)
    values = dict(model=str(model), data=[str(arithmetic_data)], output_dir=str(tmp_path / "out"), max_length=160,
                  batch_size=4, max_steps=1, mixed_precision="fp32", finetuning=finetuning, lora_r=8,
                  lora_target_modules=["q_proj", "v_proj", "up_proj"], activation_checkpointing=False)
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), json.dumps(values), str(tmp_path)], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank-*.json"))]
    assert len(ranks) == 2
    config = TrainConfig(**values)
    plan = plan_memory(describe_architecture(config), config, 2, "cpu", None, "", 4)
    planned = (plan.parts["parameters (fp32 master, sharded)"] + plan.parts["gradients (fp32, sharded)"]
               + plan.parts["optimizer (AdamW moments, sharded)"])
    for rank in ranks:
        measured = rank["params"] + rank["grads"] + rank["optimizer"]
        print(f"{finetuning} rank {rank['rank']}: planned {planned / 2**20:.2f} MiB for parameters + gradients + "
              f"optimizer, measured {measured / 2**20:.2f} MiB ({planned / measured - 1:+.1%})")
        assert abs(planned - measured) <= 0.2 * measured


def test_a_run_that_cannot_fit_is_refused_before_loading(tiny_model, arithmetic_data, tmp_path, capsys, monkeypatch):
    import collections

    import psutil

    import dtm_fast.train.loop as loop
    from tests.train.conftest import tiny_args

    monkeypatch.setattr(psutil, "virtual_memory", lambda: collections.namedtuple("Memory", "total")(2**20))
    monkeypatch.setattr(loop, "build_sharded", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, tmp_path / "out"))
    line = assert_one_line_error(code, err, "this run needs about")
    assert "and this machine's memory has 1.0 MiB" in line
