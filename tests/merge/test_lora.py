"""Merging peft LoRA adapters of a tiny Llama: every mode against an oracle that peft computes itself
(merge_and_unload of each adapter, combined in plain torch). Refusals and memory: test_lora_refusals.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import ADAPTERS, ATTENTION_AND_MLP, PROMPT, load_state, merge, tiny_llama_config
from dtm_fast.cli import main as dtm
from dtm_fast.merge.config import MergeConfig, ModelInput
from dtm_fast.merge.methods import METHODS
from dtm_fast.merge.methods.base import TensorContext


def peft_model(base: Path, adapter: Path):
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, adapter).eval()


def oracle_deltas(paths, names) -> tuple[dict, list[dict]]:
    """The base state and each sub-model's W_i - W, from peft's own merge_and_unload."""
    base = load_state(paths["base"])
    deltas = []
    for name in names:
        merged = peft_model(paths["base"], paths[name]).merge_and_unload().state_dict()
        deltas.append({key: merged[key] - base[key] for key in base})
    return base, deltas


def linear_oracle(paths, names, weights) -> dict:
    base, deltas = oracle_deltas(paths, names)
    coefficients = [w / sum(weights) for w in weights]
    return {key: base[key] + sum(c * d[key] for c, d in zip(coefficients, deltas)) for key in base}


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


def model_from_state(state: dict):
    import transformers

    model = transformers.LlamaForCausalLM(tiny_llama_config())
    model.load_state_dict(state)
    return model.eval()


def test_exact_concat_loads_with_peft_and_equals_the_weighted_sum_of_sub_model_deltas(lora_family, tmp_path):
    names, weights = ["a0", "a1", "a2"], [1.0, 2.0, 1.0]
    out = tmp_path / "concat"
    assert merge(lora_family, names, out, "--lora-mode", "exact-concat", "--weights", *map(str, weights)) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 + 4 + 8 and config["lora_alpha"] == 16 and config["use_rslora"] is False
    assert json.loads((out / "dtm_merge.json").read_text())["lora_mode"] == "exact-concat"

    expected = linear_oracle(lora_family, names, weights)
    merged = peft_model(lora_family["base"], out)
    torch.testing.assert_close(logits_of(merged), logits_of(model_from_state(expected)), rtol=0, atol=2e-5)
    state = merged.merge_and_unload().state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=2e-6, msg=key)
    base_logits = logits_of(model_from_state(load_state(lora_family["base"])))
    assert (logits_of(model_from_state(expected)) - base_logits).abs().max() > 1e-2  # the adapters matter


def test_materialize_equals_the_in_memory_merge_and_loads_with_transformers(lora_family, tmp_path):
    import transformers

    names, weights = ["a0", "a2", "a3"], [1.0, 2.0, 1.0]  # a3 adapts other modules than a0 and a2
    out = tmp_path / "full"
    assert merge(lora_family, names, out, "--weights", *map(str, weights), "--max-shard-size", "60KB") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "dtm_merge.json").read_text())["lora_mode"] == "materialize"

    expected = linear_oracle(lora_family, names, weights)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits_of(merged), logits_of(model_from_state(expected)), rtol=0, atol=2e-5)
    state = load_state(out)
    base = load_state(lora_family["base"])
    assert set(state) == set(base)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=2e-6, msg=key)
        if not any(module in key for module in ATTENTION_AND_MLP + ["k_proj", "up_proj"]):
            assert torch.equal(state[key], base[key]), key  # untouched tensors are the base's, bit for bit


def test_materialize_applies_any_method_to_the_sub_models(lora_family, tmp_path):
    names = ["a0", "a1", "a3"]
    out = tmp_path / "ta"
    assert merge(lora_family, names, out, "--method", "task_arithmetic", "--lambda", "0.7",
                 "--weights", "1", "0.5", "2") == 0
    base, deltas = oracle_deltas(lora_family, names)
    config = MergeConfig(method="task_arithmetic", models=tuple(
        ModelInput(lora_family[n], {"weight": w}) for n, w in zip(names, (1.0, 0.5, 2.0))),
        output=out, base=lora_family["base"], parameters={"lambda": 0.7})
    state = load_state(out)
    method = METHODS["task_arithmetic"]
    for key, value in base.items():
        params = config.tensor_params(key, None, None)
        expected = method.reference(params, value, [value + d[key] for d in deltas], TensorContext(key, value.shape, 0))
        torch.testing.assert_close(state[key], expected, rtol=0, atol=2e-6, msg=key)


def test_materialize_on_a_bf16_base_rounds_once_from_fp32_sub_models(lora_family, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    code = dtm(["merge", "--base", str(lora_family["base_bf16"]), str(lora_family["a0"]), str(lora_family["a2"]),
                "-o", str(out), "--weights", "3", "1", "--backend", "reference", "--quiet"])
    assert code == 0
    base = load_state(lora_family["base_bf16"])
    state = load_state(out)
    expected = {key: value.float() for key, value in base.items()}
    for name, coefficient in (("a0", 0.75), ("a2", 0.25)):  # s = alpha / r for a0, alpha / sqrt(r) for a2
        rank, alpha, rslora = ADAPTERS[name][:3]
        scale = alpha / rank ** 0.5 if rslora else alpha / rank
        factors = load_file(str(lora_family[name] / "adapter_model.safetensors"))
        for key in factors:
            if key.endswith("lora_A.weight"):
                module = key[len("base_model.model."): -len(".lora_A.weight")]
                b = factors[key.replace("lora_A", "lora_B")]
                expected[f"{module}.weight"] += coefficient * scale * (b @ factors[key])
    for key, value in base.items():
        assert state[key].dtype == torch.bfloat16
        want = expected[key].to(torch.bfloat16).float()
        # one rounding from fp32: at most one bf16 ulp apart (fp32 summation order may differ)
        assert ((state[key].float() - want).abs() <= want.abs() * 2.0**-7 + 1e-30).all(), key
        if "proj" not in key:
            assert torch.equal(state[key], value), key


def test_materialize_resumes_from_a_partial_output_to_the_same_bytes(lora_family, tmp_path):
    options = ["--method", "ties", "--density", "0.6", "--max-shard-size", "60KB"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert merge(lora_family, ["a0", "a3"], whole, *options) == 0
    # one of two processes finishes its shards and leaves the partial directory for the other ...
    assert merge(lora_family, ["a0", "a3"], resumed, *options, "--num-shards", "2", "--shard-index", "0") == 0
    assert not resumed.exists() and (tmp_path / "resumed.dtm-partial").is_dir()
    # ... and a single --resume run completes it
    assert merge(lora_family, ["a0", "a3"], resumed, *options, "--resume") == 0
    files = sorted(p.name for p in whole.glob("*.safetensors"))
    assert len(files) > 2 and files == sorted(p.name for p in resumed.glob("*.safetensors"))
    for name in files:
        assert (whole / name).read_bytes() == (resumed / name).read_bytes(), name


def test_factor_average_is_the_paper_codes_product_of_averages(lora_family, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "avg"
    assert merge(lora_family, ["a0", "a1"], out, "--lora-mode", "factor-average", "--weights", "1", "3") == 0
    c0, c1 = 0.25, 0.75
    a0 = load_file(str(lora_family["a0"] / "adapter_model.safetensors"))
    a1 = load_file(str(lora_family["a1"] / "adapter_model.safetensors"))
    result = load_file(str(out / "adapter_model.safetensors"))
    assert set(result) == set(a0)
    for key in a0:
        torch.testing.assert_close(result[key], c0 * a0[key] + c1 * a1[key], rtol=0, atol=1e-6)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)

    # what peft makes of it is s (c0 B0 + c1 B1)(c0 A0 + c1 A1), not the exact c0 s B0 A0 + c1 s B1 A1
    approximate = peft_model(lora_family["base"], out).merge_and_unload().state_dict()
    exact = linear_oracle(lora_family, ["a0", "a1"], [1.0, 3.0])
    key = "model.layers.0.mlp.gate_proj.weight"
    prefix = "base_model.model.model.layers.0.mlp.gate_proj"
    a = c0 * a0[f"{prefix}.lora_A.weight"] + c1 * a1[f"{prefix}.lora_A.weight"]
    b = c0 * a0[f"{prefix}.lora_B.weight"] + c1 * a1[f"{prefix}.lora_B.weight"]
    base = load_state(lora_family["base"])
    torch.testing.assert_close(approximate[key], base[key] + 2.0 * b @ a, rtol=0, atol=2e-6)
    assert (approximate[key] - exact[key]).abs().max() > 1e-2


def test_factor_average_warning_is_shown(lora_family, tmp_path, capsys):
    assert merge(lora_family, ["a0", "a1"], tmp_path / "avg", "--lora-mode", "factor-average") == 0
    assert "NOT the average of the sub-models" in capsys.readouterr().err


def test_small_budget_gives_the_same_bytes_as_a_large_one(lora_family, tmp_path, monkeypatch):
    from dtm_fast.merge.lora import materialize as lora_materialize

    reads = []
    original = lora_materialize.LoraTensorStream.read

    def counting_read(self, slot, start, stop):
        reads.append(stop - start)
        return original(self, slot, start, stop)

    monkeypatch.setattr(lora_materialize.LoraTensorStream, "read", counting_read)
    outputs = {}
    for budget in ("17MiB", "1GiB"):
        reads.clear()
        out = tmp_path / f"out-{budget}"
        assert merge(lora_family, ["a0", "a2", "a3"], out, "--method", "ties", "--density", "0.5",
                     "--max-memory", budget) == 0
        outputs[budget] = {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}
        if budget == "17MiB":
            assert max(reads) < 7168  # the MLP tensors (7168 elements) really came in several chunks
    assert outputs["17MiB"] == outputs["1GiB"]
