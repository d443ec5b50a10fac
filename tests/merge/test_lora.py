"""Merging peft LoRA adapters of a tiny Llama: every mode against an oracle that peft computes itself
(merge_and_unload of each adapter, combined in plain torch), and every refusal.

Adapters are built with peft in fixtures with random non-zero lora_B (peft initialises B to zero,
which would make every test pass trivially)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import load_state, peak_above_baseline, save_llama, tiny_llama_config
from dtm_fast.cli import main as dtm
from dtm_fast.errors import DtmError
from dtm_fast.merge.config import MergeConfig, ModelInput
from dtm_fast.merge.engine import run_merge
from dtm_fast.merge.methods import METHODS
from dtm_fast.merge.methods.base import TensorContext

PROMPT = torch.tensor([[1, 5, 9, 42, 7, 99, 3, 150]])
ATTENTION_AND_MLP = ["q_proj", "v_proj", "gate_proj", "down_proj"]
# name -> (r, lora_alpha, use_rslora, target modules, seed)
ADAPTERS = {
    "a0": (4, 8, False, ATTENTION_AND_MLP, 10),
    "a1": (4, 8, False, ATTENTION_AND_MLP, 11),
    "a2": (8, 4, True, ATTENTION_AND_MLP, 12),  # another rank, alpha and rslora
    "a3": (2, 4, False, ["k_proj", "up_proj"], 13),  # other modules
}


@pytest.fixture(scope="session")
def lora_family(tmp_path_factory):
    """A fp32 tiny Llama base directory and peft adapter directories trained 'on' it."""
    import peft
    import transformers

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(4321)
    config = tiny_llama_config()
    base_model = transformers.LlamaForCausalLM(config).eval()
    paths = {"base": save_llama(root / "base", base_model.state_dict(), config, torch.float32, shard="1GB"),
             "base_bf16": save_llama(root / "base-bf16", base_model.state_dict(), config, torch.bfloat16)}
    for name, (rank, alpha, rslora, targets, seed) in ADAPTERS.items():
        lora = peft.LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=targets,
                               lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        model = peft.get_peft_model(copy.deepcopy(base_model), lora)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, parameter in model.named_parameters():
                if "lora_" in key:  # A re-drawn too, so adapters differ in both factors
                    parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
        model.save_pretrained(root / name)
        paths[name] = root / name
    return paths


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


def merge(paths, names, out, *options) -> int:
    return dtm(["merge", "--base", str(paths["base"]), *(str(paths[n]) for n in names), "-o", str(out),
                "--backend", "reference", "--quiet", *options])


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


# -- refusals ------------------------------------------------------------------------------------

def edited_adapter(paths, name: str, tmp_path: Path, **changes) -> Path:
    target = tmp_path / f"{name}-edited"
    shutil.copytree(paths[name], target)
    config_path = target / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))
    return target


def lora_config(paths, models, mode="materialize", method="linear", base="base", **extra) -> MergeConfig:
    return MergeConfig(method=method, models=tuple(ModelInput(Path(m)) for m in models), output=extra.pop("out"),
                       base=paths[base] if base else None, lora_mode=mode, backend="reference", **extra)


@pytest.mark.parametrize("mode", ["exact-concat", "factor-average"])
def test_refuses_adapters_of_different_base_models(lora_family, tmp_path, mode):
    first = edited_adapter(lora_family, "a0", tmp_path, base_model_name_or_path="org/tiny-llama")
    other = edited_adapter(lora_family, "a1", tmp_path, base_model_name_or_path="some/other-model")
    with pytest.raises(DtmError, match=r"a1-edited.*base_model_name_or_path.*different base models"):
        run_merge(lora_config(lora_family, [first, other], mode, out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["exact-concat", "factor-average"])
def test_refuses_adapters_of_different_modules(lora_family, tmp_path, mode):
    with pytest.raises(DtmError, match=r"a3.*target_modules.*--lora-mode materialize"):
        run_merge(lora_config(lora_family, [lora_family["a0"], lora_family["a3"]], mode, out=tmp_path / "out"))


@pytest.mark.parametrize("field,value", [("bias", "lora_only"), ("modules_to_save", ["lm_head"]), ("use_dora", True),
                                         ("fan_in_fan_out", True), ("alpha_pattern", {"q_proj": 32})])
@pytest.mark.parametrize("mode", ["materialize", "exact-concat"])
def test_refuses_trained_biases_and_modules_to_save(lora_family, tmp_path, field, value, mode):
    edited = edited_adapter(lora_family, "a1", tmp_path, **{field: value})
    with pytest.raises(DtmError, match=rf"a1-edited/adapter_config.json: field '{field}'"):
        run_merge(lora_config(lora_family, [lora_family["a0"], edited], mode, out=tmp_path / "out"))


def test_refuses_a_missing_base(lora_family, tmp_path, capsys):
    code = dtm(["merge", str(lora_family["a0"]), str(lora_family["a1"]), "-o", str(tmp_path / "out"), "--quiet"])
    assert code == 1
    assert "needs --base" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["exact-concat", "factor-average"])
def test_refuses_methods_other_than_linear_outside_materialize(lora_family, tmp_path, mode):
    with pytest.raises(DtmError, match=r"linear method only.*--lora-mode materialize"):
        run_merge(lora_config(lora_family, [lora_family["a0"], lora_family["a1"]], mode, method="ties",
                              out=tmp_path / "out", parameters={"density": 0.5}))


def test_materialize_refuses_unnormalised_linear_weights_that_would_scale_the_base(lora_family, tmp_path, capsys):
    assert merge(lora_family, ["a0", "a1"], tmp_path / "out", "--no-normalize", "--weights", "1", "1") == 1
    assert "would scale the base weights by 2" in capsys.readouterr().err
    assert not (tmp_path / "out.dtm-partial").exists()


def test_a_budget_too_small_is_refused_before_any_output_exists(lora_family, tmp_path, capsys):
    assert merge(lora_family, ["a0", "a1"], tmp_path / "out", "--max-memory", "16MiB") == 1
    assert "--max-memory 16 MiB is too small for this LoRA merge" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_factor_average_refuses_unequal_ranks(lora_family, tmp_path):
    with pytest.raises(DtmError, match=r"a2/adapter_config.json: field 'r' is 8.*exact-concat"):
        run_merge(lora_config(lora_family, [lora_family["a0"], lora_family["a2"]], "factor-average",
                              out=tmp_path / "out"))


def test_refuses_an_adapter_as_base_and_a_mix_of_adapters_and_full_models(lora_family, tmp_path):
    with pytest.raises(DtmError, match="the base must be a full model"):
        run_merge(lora_config(lora_family, [lora_family["a1"]], base="a0", out=tmp_path / "out"))
    with pytest.raises(DtmError, match=r"base.*is a full model but other inputs are LoRA adapters"):
        run_merge(lora_config(lora_family, [lora_family["a0"], lora_family["base"]], out=tmp_path / "out"))


def test_refuses_an_adapter_of_another_shape(lora_family, tmp_path):
    from safetensors.torch import load_file, save_file

    target = tmp_path / "wide"
    shutil.copytree(lora_family["a0"], target)
    tensors = load_file(str(target / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    tensors[key] = torch.ones(65, 4)
    save_file(tensors, str(target / "adapter_model.safetensors"))
    with pytest.raises(DtmError, match=r"wide.*model.layers.1.self_attn.q_proj.*\[65, 64\].*another base model"):
        run_merge(lora_config(lora_family, [target], out=tmp_path / "out"))


# -- memory ----------------------------------------------------------------------------------------

PEAK_SCRIPT = """
import sys
from pathlib import Path
from dtm_fast.merge.backends import select_backend
from dtm_fast.merge.config import MergeConfig, ModelInput
from dtm_fast.merge.engine import run_merge
import dtm_fast.merge.lora.materialize  # imports before the baseline

base, first, second, budget, out = sys.argv[1:6]
select_backend("reference")
baseline = start_peak()
run_merge(MergeConfig(method="linear", models=(ModelInput(Path(first)), ModelInput(Path(second))), output=Path(out),
                      base=Path(base), max_memory=int(budget), backend="reference"))
report_peak(baseline)
"""


def write_adapter(path: Path, module: str, a: torch.Tensor, b: torch.Tensor, alpha: float) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({f"base_model.model.{module}.lora_A.weight": a, f"base_model.model.{module}.lora_B.weight": b},
              str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": a.shape[0], "lora_alpha": alpha, "target_modules": [module.split(".")[-1]],
        "bias": "none", "modules_to_save": None, "use_rslora": False}))
    return path


def test_materialize_peak_memory_stays_within_budget_with_a_tensor_three_times_larger(tmp_path):
    from safetensors.torch import save_file

    module = "model.layers.0.mlp.down_proj"
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(6144, 4096, generator=generator)  # 96 MiB against a 32 MiB budget
    (tmp_path / "base").mkdir()
    save_file({f"{module}.weight": weight, "model.norm.weight": torch.ones(4096)},
              str(tmp_path / "base" / "model.safetensors"))
    factors = [(torch.randn(8, 4096, generator=generator), torch.randn(6144, 8, generator=generator), 16.0),
               (torch.randn(8, 4096, generator=generator), torch.randn(6144, 8, generator=generator), 4.0)]
    adapters = [write_adapter(tmp_path / f"a{i}", module, a, b, alpha) for i, (a, b, alpha) in enumerate(factors)]
    budget = 32 * 2**20
    above_baseline = peak_above_baseline(PEAK_SCRIPT, tmp_path / "base", *adapters, budget, tmp_path / "out")
    assert above_baseline <= budget, f"peak {above_baseline / 2**20:.1f} MiB above baseline > 32 MiB budget"
    merged = load_state(tmp_path / "out")
    expected = weight + sum(0.5 * (alpha / 8) * (b @ a) for a, b, alpha in factors)
    torch.testing.assert_close(merged[f"{module}.weight"], expected, rtol=0, atol=5e-5)
    assert torch.equal(merged["model.norm.weight"], torch.ones(4096))


def test_refuses_tensors_that_are_not_linear_lora_factors(lora_family, tmp_path):
    from safetensors.torch import load_file, save_file

    target = tmp_path / "embedding-lora"
    shutil.copytree(lora_family["a0"], target)
    tensors = load_file(str(target / "adapter_model.safetensors"))
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.ones(4, 160)
    save_file(tensors, str(target / "adapter_model.safetensors"))
    with pytest.raises(DtmError, match=r"embedding-lora: tensor .*lora_embedding_A.* is not a LoRA factor"):
        run_merge(lora_config(lora_family, [target], out=tmp_path / "out"))
