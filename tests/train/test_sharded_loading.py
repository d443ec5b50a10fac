"""Sharded loading (issue 11.1): each rank builds the model on the meta device, is sharded by
FSDP2, and reads only its own rows of every tensor from the safetensors files. Oracles: the
safetensors library's own reader (`safe_open(...).get_slice`) for the values, `from_pretrained` for
what loading meant before, torch.chunk for the row split, a 1-process run for the losses."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dtm_fast.train.tensor_rows import RowReader, RowSource, row_range


@pytest.mark.parametrize("rows,world", [(10, 3), (7, 2), (1, 4), (0, 2), (64, 8), (5, 5)])
def test_row_ranges_are_torch_chunk(rows, world):
    chunks = torch.arange(rows).chunk(world) if rows else ()
    for rank in range(world):
        start, stop = row_range(rows, rank, world)
        expected = chunks[rank].tolist() if rank < len(chunks) else []
        assert list(range(start, stop)) == expected


def test_reader_fills_rows_from_several_files_and_casts(tmp_path):
    from safetensors.torch import save_file

    from dtm_fast.io.safetensors_format import read_header

    full = torch.randn(11, 6, generator=torch.Generator().manual_seed(1)).bfloat16()
    save_file({"w": full[:4].contiguous()}, str(tmp_path / "a.safetensors"))
    save_file({"w": full[4:].contiguous(), "f": full.float()}, str(tmp_path / "b.safetensors"))
    pieces = [RowSource(read_header(tmp_path / "a.safetensors").tensors["w"], 0),
              RowSource(read_header(tmp_path / "b.safetensors").tensors["w"], 4)]
    with RowReader() as reader:
        out = torch.empty(5, 6)  # rows 2..6 straddle both files; widened to fp32 exactly
        reader.fill(out, 2, pieces, "w")
        assert torch.equal(out, full[2:7].float())
        direct = torch.empty(3, 6)  # same dtype: read straight into the destination
        reader.fill(direct, 8, [RowSource(read_header(tmp_path / "b.safetensors").tensors["f"])], "f")
        assert torch.equal(direct, full[8:11].float())
        from dtm_fast.errors import DtmError

        with pytest.raises(DtmError, match="hold 2 of the 5 rows"):
            reader.fill(torch.empty(5, 6), 2, pieces[:1], "w")


def test_one_process_load_equals_from_pretrained_bit_for_bit(tmp_path):
    from transformers import AutoModelForCausalLM

    from dtm_fast.train.config import TrainConfig
    from dtm_fast.train.loading import build_sharded
    from dtm_fast.train.model import load_model
    from dtm_fast.train.parallel import init_runtime
    from dtm_fast.train.tiny import write_tiny_llama

    directory = write_tiny_llama(tmp_path / "base", tie_embeddings=True)
    AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).save_pretrained(directory)  # a bf16 base
    config = TrainConfig(model=str(directory), data=("unused",), output_dir=str(tmp_path / "o"))
    model, export_dtype = build_sharded(config, "sdpa", init_runtime(), torch.float32)
    today = load_model(config, "sdpa")
    assert export_dtype == "bfloat16"
    ours, theirs = dict(model.named_parameters()), dict(today.named_parameters())
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    probe = torch.tensor([[5, 70, 71, 72, 73, 30]])
    assert torch.equal(model(input_ids=probe).logits, today(input_ids=probe).logits)


def test_checkpoint_names_that_differ_fall_back_to_a_whole_load_with_a_warning(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    from dtm_fast.errors import DtmError
    from dtm_fast.train.config import TrainConfig
    from dtm_fast.train.loading import build_sharded
    from dtm_fast.train.parallel import init_runtime
    from dtm_fast.train.tiny import write_tiny_llama

    # a base saved without the "model." prefix (as LlamaModel saves it): transformers maps the names
    directory = write_tiny_llama(tmp_path / "base", tie_embeddings=True)
    tensors = load_file(directory / "model.safetensors")
    save_file({name.removeprefix("model."): t for name, t in tensors.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    config = TrainConfig(model=str(directory), data=("unused",), output_dir=str(tmp_path / "o"))
    with caplog.at_level("WARNING"):
        model, _ = build_sharded(config, "sdpa", init_runtime(), torch.float32)
    assert "'model.embed_tokens.weight' is not in the checkpoint, so every rank loads the whole model" in caplog.text
    assert all(torch.equal(dict(model.named_parameters())[name], tensor) for name, tensor in tensors.items())

    # a checkpoint that lacks a weight is refused, not filled with random values
    del tensors["model.norm.weight"]
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DtmError, match="lacks 1 weight.* e.g. 'model.norm.weight'; the checkpoint is incomplete"):
        build_sharded(config, "sdpa", init_runtime(), torch.float32)


def big_llama(directory):
    """A Llama of 168 M parameters (672 MB in fp32), stored in bf16 as a pretrained base usually is."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory, max_shard_size="200MB")
    return directory


# one rank's load, in its own interpreter: peak resident memory above the baseline taken after the
# imports and the process group, then every value compared with the file (safetensors' reader)
LOAD_SCRIPT = """
import sys, torch
import accelerate, peft, transformers, torch.distributed.fsdp
from safetensors import safe_open
from dtm_fast.io.checkpoint import open_checkpoint
from dtm_fast.train.config import TrainConfig
from dtm_fast.train.loading import build_sharded
from dtm_fast.train.model import load_model
from dtm_fast.train.parallel import init_runtime
from dtm_fast.train.tensor_rows import local_rows

mode, directory = sys.argv[1], sys.argv[2]
runtime = init_runtime()
config = TrainConfig(model=directory, data=("unused",), output_dir=directory + "-out", activation_checkpointing=False)
files = {name: entry.path for name, entry in open_checkpoint(directory).tensors.items()}
baseline = start_peak()
model = load_model(config, "sdpa") if mode == "today" else build_sharded(config, "sdpa", runtime, torch.float32)[0]
peak = status("VmHWM") - baseline
mismatched = held = 0
for name, param in model.named_parameters():
    local, first = local_rows(param)
    with safe_open(str(files[name]), "pt") as handle:
        expected = handle.get_slice(name)[first:first + local.shape[0]].float()
    held += local.numel() * 4
    mismatched += not torch.equal(local, expected)
print(json.dumps({"rank": runtime.rank, "above_baseline": peak, "mismatched": mismatched, "held": held}))
"""


@pytest.mark.slow
def test_two_ranks_each_use_far_less_memory_than_a_whole_load(tmp_path_factory):
    from tests.merge.conftest import PEAK_PRELUDE

    directory = big_llama(tmp_path_factory.mktemp("big") / "base")
    script = tmp_path_factory.mktemp("script") / "load.py"
    script.write_text(PEAK_PRELUDE + LOAD_SCRIPT)
    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")

    def measure(mode, *launch):
        result = subprocess.run([*launch, str(script), mode, str(directory)], capture_output=True, text=True,
                                env=environment, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    (today,) = measure("today", sys.executable)
    ranks = measure("sharded", sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    assert today["mismatched"] == 0 and today["held"] >= 400e6
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for rank in ranks:
        assert rank["mismatched"] == 0  # bit for bit the file's values, as from_pretrained gives
        ratio = rank["above_baseline"] / today["above_baseline"]
        print(f"rank {rank['rank']}: peak RSS growth {rank['above_baseline'] / 2**20:.0f} MiB against "
              f"{today['above_baseline'] / 2**20:.0f} MiB for one whole load ({ratio:.2f}x); holds "
              f"{rank['held'] / 2**20:.0f} MiB of fp32 weights")
        assert ratio <= 0.6
