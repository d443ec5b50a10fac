"""mergekit's `modules:` syntax (a causal LM has one module, `default`) and a slice's own
`base_model`, checked against mergekit run on the same YAML; what cannot apply is refused by name."""

from __future__ import annotations

from pathlib import Path

from dtm_fast.cli import main as dtm
from test_mergekit_configs import assert_same, both


def test_default_module_with_models_and_its_own_parameters(llama_family, tmp_path):
    p = llama_family["fp32"]
    theirs, ours, _ = both(f"merge_method: task_arithmetic\nbase_model: {p['base']}\nparameters: {{weight: 0.3}}\n"
                        "modules:\n  default:\n    parameters: {weight: 0.9}\n    models:\n"
                        f"      - model: {p['m0']}\n      - model: {p['m1']}\n        parameters: {{weight: 0.5}}\n"
                        "dtype: float32\n", tmp_path)
    assert_same(theirs, ours)


def test_default_module_with_slices_and_a_slice_base(llama_family, tmp_path):
    p = llama_family["fp32"]
    theirs, ours, _ = both("merge_method: ties\nparameters: {density: 0.6}\nmodules:\n  default:\n    slices:\n"
                        f"      - base_model: {p['base']}\n        sources:\n"
                        f"          - model: {p['m0']}\n            layer_range: [0, 2]\n            parameters: {{weight: 1.0}}\n"
                        f"          - model: {p['m1']}\n            layer_range: [0, 2]\n            parameters: {{weight: 0.5}}\n"
                        f"          - model: {p['base']}\n            layer_range: [0, 2]\n"
                        "dtype: float32\n", tmp_path)
    assert_same(theirs, ours)


def refused(text: str, tmp_path: Path, capsys) -> str:
    config = tmp_path / "bad.yml"
    config.write_text(text)
    assert dtm(["merge", str(config), str(tmp_path / "out"), "--quiet"]) != 0
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and not (tmp_path / "out").exists()
    return error


def test_modules_that_cannot_apply_are_refused(llama_family, tmp_path, capsys):
    p = llama_family["fp32"]
    models = f"models:\n      - model: {p['m0']}\n      - model: {p['m1']}\n"
    error = refused(f"merge_method: linear\nmodules:\n  vision_tower:\n    {models}", tmp_path, capsys)
    assert "vision_tower" in error and "default" in error
    error = refused(f"merge_method: linear\nmodules:\n  default:\n    {models}models:\n  - model: {p['m0']}\n",
                    tmp_path, capsys)
    assert "not both" in error
    slices = "".join(f"  - base_model: {p[b]}\n    sources:\n      - model: {p['m0']}\n        layer_range: [{i}, {i + 1}]\n"
                     for i, b in enumerate(("base", "m2")))
    error = refused(f"merge_method: task_arithmetic\nslices:\n{slices}", tmp_path, capsys)
    assert "different base models" in error


def test_residual_weight_is_ignored_and_named(llama_family, tmp_path, capsys):
    p = llama_family["fp32"]
    config = tmp_path / "merge.yml"
    config.write_text("merge_method: linear\nslices:\n  - residual_weight: 0.5\n    sources:\n"
                      f"      - model: {p['m0']}\n        layer_range: [0, 2]\n"
                      f"      - model: {p['m1']}\n        layer_range: [0, 2]\n")
    assert dtm(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 0
    assert "residual_weight (slices[0]" in capsys.readouterr().err
