"""LoRA merges that must be refused (with the adapter, field or module named) and the memory bound
of --lora-mode materialize on a tensor three times larger than the budget."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import load_state, merge, peak_above_baseline
from dtm_fast.cli import main as dtm
from dtm_fast.errors import DtmError
from dtm_fast.merge.config import MergeConfig, ModelInput
from dtm_fast.merge.engine import run_merge


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
