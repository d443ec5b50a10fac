"""mergekit `slices` in full: several slices, partial layer ranges, other sources per slice and
per-slice parameters give mergekit's model (checked by running mergekit on the same YAML), with
the output's layer count in config.json; bad slices are one-line errors naming the slice."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import load_state, run_mergekit
from dtm_fast.cli import main as dtm


def run_both(text: str, tmp_path):
    config = tmp_path / "merge.yml"
    config.write_text(text)
    run_mergekit(config, tmp_path / "mergekit")
    assert dtm(["merge", str(config), str(tmp_path / "dtm"), "--quiet"]) == 0
    theirs, ours = load_state(tmp_path / "mergekit"), load_state(tmp_path / "dtm")
    assert theirs.keys() == ours.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=2e-6, atol=2e-7, msg=name)
    return ours


def test_layer_stacking_takes_each_layer_from_its_slice(llama_family, tmp_path):
    paths = llama_family["fp32"]
    ours = run_both(f"""merge_method: linear
parameters: {{weight: 1.0}}
slices:
  - sources: [{{model: {paths['m0']}, layer_range: [0, 2]}}]
  - sources: [{{model: {paths['m1']}, layer_range: [1, 2]}}]
  - sources: [{{model: {paths['m2']}, layer_range: [0, 1]}}]
dtype: float32
""", tmp_path)
    m0, m1, m2 = (load_state(paths[f"m{i}"]) for i in range(3))
    name = "model.layers.{}.mlp.down_proj.weight"
    assert torch.equal(ours[name.format(0)], m0[name.format(0)])
    assert torch.equal(ours[name.format(2)], m1[name.format(1)])
    assert torch.equal(ours[name.format(3)], m2[name.format(0)])
    assert torch.equal(ours["model.embed_tokens.weight"], m0["model.embed_tokens.weight"])  # from the first slice
    assert torch.equal(ours["model.norm.weight"], m2["model.norm.weight"])  # from the last
    assert json.loads((tmp_path / "dtm" / "config.json").read_text())["num_hidden_layers"] == 4
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dtm")
    assert len(model.model.layers) == 4
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_slerp_slices_with_their_own_gradients(llama_family, tmp_path):
    paths = llama_family["fp32"]
    run_both(f"""merge_method: slerp
base_model: {paths['base']}
slices:
  - sources:
      - {{model: {paths['base']}, layer_range: [0, 1]}}
      - {{model: {paths['m0']}, layer_range: [0, 1]}}
    parameters: {{t: 0.2}}
  - sources:
      - {{model: {paths['base']}, layer_range: [1, 2]}}
      - {{model: {paths['m0']}, layer_range: [1, 2]}}
    parameters:
      t:
        - filter: self_attn
          value: 0.9
        - value: [0.3, 0.6]
dtype: float32
""", tmp_path)


def test_ties_slices_with_per_source_parameters(llama_family, tmp_path):
    paths = llama_family["fp32"]
    run_both(f"""merge_method: task_arithmetic
base_model: {paths['base']}
parameters: {{weight: 0.5}}
slices:
  - sources:
      - {{model: {paths['base']}, layer_range: [0, 2]}}
      - {{model: {paths['m0']}, layer_range: [0, 2], parameters: {{weight: 1.5}}}}
      - {{model: {paths['m1']}, layer_range: [0, 2]}}
  - sources:
      - {{model: {paths['base']}, layer_range: [1, 2]}}
      - {{model: {paths['m2']}, layer_range: [1, 2], parameters: {{weight: [0.2, 0.7]}}}}
    parameters: {{lambda: 0.8}}
dtype: float32
""", tmp_path)


@pytest.mark.parametrize("slices, expected", [
    ("[{sources: [{model: M0, layer_range: [0, 3]}]}]", "goes past the 2 layers"),
    ("[{sources: [{model: M0, layer_range: [0, 2]}, {model: M1, layer_range: [0, 1]}]}]", "same number of layers"),
    ("[{sources: [{model: M0, layer_range: [1, 1]}]}]", "0 <= first < end"),
    # residual_weight is accepted and ignored now, as mergekit never uses it (test_modules_syntax.py)
    ("[{sources: [{model: M0, layer_range: [0, 1], colour: 1}]}]", "'colour'"),
])
def test_bad_slices_are_one_line_errors(llama_family, tmp_path, capsys, slices, expected):
    paths = llama_family["fp32"]
    config = tmp_path / "merge.yml"
    config.write_text("merge_method: linear\nparameters: {weight: 1.0}\nslices: "
                      + slices.replace("M0", str(paths["m0"])).replace("M1", str(paths["m1"])) + "\n")
    assert dtm(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert expected in err and "slices[0]" in err and len(err.strip().splitlines()) == 1, err


def test_a_task_vector_slice_without_the_base_is_refused(llama_family, tmp_path, capsys):
    paths = llama_family["fp32"]
    config = tmp_path / "merge.yml"
    config.write_text(f"merge_method: ties\nbase_model: {paths['base']}\nslices:\n"
                      f"  - sources: [{{model: {paths['m0']}, layer_range: [0, 1]}}]\n")
    assert dtm(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 1
    assert "needs the base model among the slice's sources" in capsys.readouterr().err
