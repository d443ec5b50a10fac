"""The GPU throughput path, checked on CPU (issue 11.3): the flattened variable-length batches that
flash-attention gets, per-layer torch.compile, weight decay only on matrices, and the FLOPs, MFU and
per-device tokens/s of the metrics line."""

import json

import pytest
import torch
import torch.nn.functional as F

from dtm_fast.data.chat import IGNORE_INDEX, TokenizedExample
from dtm_fast.data.packing import collate, collate_flat
from tests.train.conftest import make_config, run_trainer


def examples():
    generator = torch.Generator().manual_seed(0)
    made = []
    for length in (7, 12, 5, 9):
        ids = torch.randint(0, 255, (length,), generator=generator).tolist()
        made.append(TokenizedExample(ids, [IGNORE_INDEX] * 2 + ids[2:], f"example-{length}"))
    return made


def test_flattened_batch_has_the_cumulative_lengths_transformers_derives():
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    items = examples()
    rows = [[0, 1], [2], [3]]
    flat = collate_flat(items, rows)
    assert flat.input_ids.shape == (1, 33) and flat.real_tokens == flat.padded_tokens == 33  # no padding at all
    assert flat.cu_seq_lens.tolist() == [0, 7, 19, 24, 33] and flat.cu_seq_lens.dtype == torch.int32
    assert flat.max_seq_len == 12
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(flat.position_ids)  # the peer's own inference
    assert torch.equal(cu_q, flat.cu_seq_lens) and torch.equal(cu_k, flat.cu_seq_lens) and int(max_q) == 12
    kwargs = flat.attention_kwargs("cpu")
    assert set(kwargs) == {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    padded = collate(items, rows, pad_id=0)
    assert padded.attention_kwargs("cpu") == {} and padded.sequence_lengths == flat.sequence_lengths
    # the same targets as the padded layout, once the padding is taken out
    unpadded = [t for row_targets, row in zip(padded.targets.tolist(), rows)
                for t in row_targets[:sum(len(items[i]) for i in row)]]
    assert flat.targets[0].tolist() == unpadded


def test_flattened_batch_gives_the_padded_loss(tiny_model):
    """sdpa on CPU reads the flattened row's boundaries from its position_ids restarts: the loss must
    be the padded layout's, which proves ids, positions and targets line up."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    items = examples()
    rows = [[0, 1], [2], [3]]

    def loss(batch):
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

    with torch.no_grad():
        assert abs(float(loss(collate_flat(items, rows))) - float(loss(collate(items, rows, pad_id=0)))) < 1e-4


def test_flash_attention_selects_flattened_batches(tiny_model, arithmetic_data, tmp_path, monkeypatch):
    import importlib.util

    from dtm_fast.train.loop import Trainer
    from dtm_fast.train.model import select_attention, uses_varlen_batches
    from dtm_fast.train.parallel import init_runtime

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn"
                        else real_find_spec(name, *a))
    assert select_attention("auto", "cuda") == "flash_attention_2" and uses_varlen_batches("flash_attention_2")
    assert select_attention("auto", "cpu") == "sdpa" and not uses_varlen_batches("sdpa")
    assert not uses_varlen_batches("eager")
    trainer = Trainer(make_config(tiny_model, arithmetic_data, tmp_path / "o", micro_batch_size=2), init_runtime())
    trainer.build()
    assert all(batch.cu_seq_lens is None and batch.input_ids.shape[0] == 2 for batch in trainer._micro_batches(0))
    trainer.attention = "flash_attention_2"  # what a CUDA run with flash-attn selects
    flat = trainer._micro_batches(0)
    assert all(batch.input_ids.shape[0] == 1 and batch.cu_seq_lens[-1] == batch.input_ids.shape[1] for batch in flat)


def test_weight_decay_skips_norms_and_biases_as_transformers_trainer_does(tiny_model, arithmetic_data, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer

    from dtm_fast.train.optim import build_optimizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.ones(64))  # a bias, to have one
    config = make_config(tiny_model, arithmetic_data, tmp_path, weight_decay=0.5, learning_rate=0.1)
    optimizer, _ = build_optimizer(model, config, total_steps=10, device_type="cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed == set(Trainer.get_decay_parameter_names(None, model))  # the peer's rule, applied to our model
    assert "model.layers.0.self_attn.q_proj.bias" not in decayed and "model.norm.weight" not in decayed
    # behaviour: with zero gradients AdamW changes a parameter only through decay
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    for name, param in model.named_parameters():
        expected = before[name] * (1 - lr * 0.5) if name in decayed else before[name]
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-7)


def test_flops_by_hand_and_the_peak_lookup(monkeypatch):
    from dtm_fast.train.throughput import FlopModel, device_peak, mfu

    full = FlopModel(linear_weights=1000, trainable_linear=1000, frozen_base=False, layers=2, attention_width=8)
    assert full.step_flops([3, 5]) == 6 * 1000 * 8 + 12 * 2 * 8 * (9 + 25)
    lora = FlopModel(linear_weights=1000, trainable_linear=40, frozen_base=True, layers=2, attention_width=8)
    assert lora.step_flops([4]) == (4 * 1000 + 2 * 40) * 4 + 12 * 2 * 8 * 16
    assert mfu(1e12, 2.0, 2, 1e12) == 0.25 and mfu(1e12, 1.0, 1, None) is None

    assert device_peak(torch.device("cpu"), torch.float32, None) == (
        None, "no known peak for cpu: set peak_tflops to report MFU")
    assert device_peak(torch.device("cpu"), torch.float32, 2.5)[0] == 2.5e12
    cuda = torch.device("cuda", 0)
    for name, peak in [("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989.4e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362.05e12), ("NVIDIA L4", 121e12),
                       ("NVIDIA A10", 125e12)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert device_peak(cuda, torch.bfloat16, None)[0] == peak, name
    assert device_peak(cuda, torch.float32, None)[0] is None  # the table's peaks are bf16
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Some Future GPU")
    assert "no known peak for Some Future GPU" in device_peak(cuda, torch.bfloat16, None)[1]


def test_flop_model_counts_every_linear_weight(tiny_model):
    from transformers import AutoModelForCausalLM

    from dtm_fast.train.throughput import flop_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    embeddings = model.model.embed_tokens.weight.numel()
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    counted = flop_model(model, layers=2)
    assert counted.linear_weights == model.num_parameters() - embeddings - norms  # untied: lm_head is a matmul
    assert counted.attention_width == 64 and not counted.frozen_base


def test_metrics_line_has_tokens_per_device_and_mfu(tiny_model, arithmetic_data, tmp_path):
    run_trainer(make_config(tiny_model, arithmetic_data, tmp_path / "cpu"))
    record = json.loads((tmp_path / "cpu" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["mfu"] is None  # no known peak for a CPU: none is invented
    assert record["tokens_per_s_per_device"] == record["tokens_per_s"]  # one device

    trainer, _ = run_trainer(make_config(tiny_model, arithmetic_data, tmp_path / "given", peak_tflops=1e-6))
    first = json.loads((tmp_path / "given" / "metrics.jsonl").read_text().splitlines()[0])
    lengths = trainer._sequence_lengths(0)
    seconds = sum(lengths) / first["tokens_per_s"]
    expected = trainer.flops.step_flops(lengths) / seconds / 1e6
    assert first["mfu"] == pytest.approx(expected, rel=1e-3)


@pytest.mark.slow
def test_compiled_layers_train_like_eager(tiny_model, arithmetic_data, tmp_path):
    _, eager = run_trainer(make_config(tiny_model, arithmetic_data, tmp_path / "eager", max_steps=3))
    _, compiled = run_trainer(make_config(tiny_model, arithmetic_data, tmp_path / "compiled", max_steps=3, compile=True))
    assert compiled.losses != [] and len(compiled.losses) == 3
    for a, b in zip(eager.losses, compiled.losses):
        assert abs(a - b) < 1e-5, (eager.losses, compiled.losses)
    from safetensors.torch import load_file

    one = load_file(tmp_path / "eager" / "model-00001-of-00001.safetensors")
    two = load_file(tmp_path / "compiled" / "model-00001-of-00001.safetensors")
    assert sorted(one) == sorted(two)  # compiling in place keeps the tensor names
    assert max(float((one[n] - two[n]).abs().max()) for n in one) < 1e-5
