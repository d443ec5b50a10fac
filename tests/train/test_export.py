"""The exported directories load with transformers / peft and reproduce the in-memory model."""

import json

import torch
import torch.nn.functional as F
from safetensors import safe_open

from tests.train.conftest import make_config, run_trainer


def probe_input():
    return torch.tensor([[5, 70, 71, 72, 73, 30, 40, 90]])


def test_full_export_reloads_with_transformers(tiny_model, arithmetic_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = tmp_path / "sub-0"
    # 0.1 MB shards force several files for this 0.4 MB model
    config = make_config(tiny_model, arithmetic_data, output, max_shard_size_mb=0.1, export_dtype="float32")
    trainer, _ = run_trainer(config)
    index = json.loads((output / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all(name.startswith("model-") and name.endswith(f"-of-{len(files):05d}.safetensors")
                         for name in files)
    for required in ("config.json", "generation_config.json", "tokenizer.json", "dtm_train.json", "loss.png",
                     "metrics.jsonl"):
        assert (output / required).is_file(), required
    assert not list(tmp_path.glob(".sub-0*"))  # no staging or replaced directory left

    reloaded = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=probe_input(), use_cache=False).logits
        got = reloaded(input_ids=probe_input()).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the weights moved, and the tensor names are the base checkpoint's (what dtm merge aligns)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with safe_open(tiny_model / "model.safetensors", "pt") as handle:
        assert sorted(handle.keys()) == sorted(index["weight_map"])
    assert any((p - q).abs().max() > 1e-4 for p, q in zip(base.parameters(), reloaded.parameters()))
    assert AutoTokenizer.from_pretrained(output).chat_template

    manifest = json.loads((output / "dtm_train.json").read_text())
    assert manifest["config"]["max_steps"] == 4 and manifest["result"]["kind"] == "hf_model"
    assert len(manifest["inputs"]["data"][0]["sha256"]) == 64


def test_lora_adapter_loads_with_peft(tiny_model, arithmetic_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output = tmp_path / "sub-lora"
    config = make_config(tiny_model, arithmetic_data, output, finetuning="lora", lora_r=4, lora_alpha=8,
                         lora_target_modules=("q_proj", "gate_proj", "down_proj"), learning_rate=1e-2)
    trainer, _ = run_trainer(config)
    assert (output / "adapter_config.json").is_file() and (output / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((output / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and set(adapter_config["target_modules"]) == {"q_proj", "gate_proj", "down_proj"}

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, output).eval()
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=probe_input(), use_cache=False).logits
        got = loaded(input_ids=probe_input()).logits
        untouched = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)(input_ids=probe_input()).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - untouched).abs().max() > 1e-4  # the adapter is not a no-op


def test_fisher_matches_a_plain_per_example_computation(tiny_model, arithmetic_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from dtm_fast.data.packing import collate
    from dtm_fast.train.loop import prepare_data
    from dtm_fast.train.model import load_tokenizer

    output = tmp_path / "sub-fisher"
    data = tmp_path / "twelve.jsonl"  # few examples keep the per-example oracle quick
    data.write_text("".join(arithmetic_data.read_text().splitlines(keepends=True)[:12]))
    config = make_config(tiny_model, data, output, max_steps=2, fisher_samples=1000, export_dtype="float32")
    run_trainer(config)
    # the oracle: the exported model, one backward per example, squared gradients averaged
    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    examples, _, _ = prepare_data(config, load_tokenizer(config))
    squares = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for index in range(len(examples)):
        model.zero_grad()
        batch = collate(examples, [[index]], pad_id=0)
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
        F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=-100, reduction="sum").backward()
        for name, p in model.named_parameters():
            squares[name] += p.grad ** 2
    with safe_open(output / "fisher.safetensors", "pt") as handle:
        assert sorted(handle.keys()) == sorted(squares)
        for name, total in squares.items():
            torch.testing.assert_close(handle.get_tensor(name), total / len(examples), atol=1e-6, rtol=1e-3)
