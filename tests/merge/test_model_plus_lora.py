"""mergekit's `model+lora`: each adapter applied to its model on the fly, never written as a full
copy: the result equals mergekit's (which merges the adapter into a cached copy with peft) and the
plain-torch W + s B A, also when the models themselves differ and only some carry adapters."""

from __future__ import annotations

import torch

from conftest import load_state, run_mergekit
from dtm_fast.cli import main as dtm


def test_linear_of_adapted_models_equals_mergekit(lora_family, tmp_path):
    base = lora_family["base"]
    config = tmp_path / "merge.yml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {base}+{lora_family['a0']}\n"
                      f"    parameters: {{weight: 1.0}}\n  - model: {base}+{lora_family['a2']}\n"
                      f"    parameters: {{weight: 3.0}}\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
                      "dtype: float32\n")
    run_mergekit(config, tmp_path / "mergekit", "--lora-merge-cache", str(tmp_path / "mergekit-lora-cache"))
    assert dtm(["merge", str(config), str(tmp_path / "dtm"), "--quiet", "--max-memory", "24MiB"]) == 0
    theirs, ours = load_state(tmp_path / "mergekit"), load_state(tmp_path / "dtm")
    assert theirs.keys() == ours.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=2e-6, msg=name)
    assert not list((tmp_path / "dtm").parent.glob("dtm*cache*"))  # dtm wrote no merged copy


def test_task_arithmetic_of_an_adapted_fine_tune_is_w_plus_s_ba(lora_family, tmp_path):
    import json

    from safetensors.torch import load_file

    base = lora_family["base"]
    config = tmp_path / "merge.yml"
    config.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nparameters: {{weight: 1.0}}\n"
                      f"models:\n  - model: {base}+{lora_family['a1']}\n")
    assert dtm(["merge", str(config), str(tmp_path / "dtm"), "--quiet"]) == 0
    merged, original = load_state(tmp_path / "dtm"), load_state(base)
    adapter = load_file(str(lora_family["a1"] / "adapter_model.safetensors"))
    settings = json.loads((lora_family["a1"] / "adapter_config.json").read_text())
    scale = settings["lora_alpha"] / settings["r"]
    prefix = "base_model.model.model.layers.0.mlp.gate_proj"
    name = "model.layers.0.mlp.gate_proj.weight"
    expected = original[name] + scale * adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
    torch.testing.assert_close(merged[name], expected, rtol=0, atol=2e-6)
    assert torch.equal(merged["model.norm.weight"], original["model.norm.weight"])
    record = json.loads((tmp_path / "dtm" / "dtm_merge.json").read_text())
    assert record["models"][0]["adapter"]["path"] == str(lora_family["a1"])
