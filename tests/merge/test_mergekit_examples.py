"""mergekit's own example configs (mergekit/examples/*.yml), rewritten only where they must be: the
models are local tiny Llamas (two layers, so 40-layer ranges become [0, 2]) and the dtype is the
models' own (fp32 or bf16; the examples say float16); methods, parameters, gradients and filters are
as mergekit ships them. Each runs through mergekit-yaml and dtm merge, and every element must agree
within one unit in the last place of the output dtype plus the rounding of a sum of terms as large as
the tensor's largest (both tools compute in floating point, in other orders: mergekit in the config's
dtype, dtm in fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_state, run_mergekit
from dtm_fast.cli import main as dtm
import torch

EXAMPLES = {
    # examples/linear.yml
    "linear": """
models:
  - model: {m0}
    parameters:
      weight: 1.0
  - model: {m1}
    parameters:
      weight: 0.3
  - model: {m2}
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
    # examples/ties.yml as mergekit 0.1.5 ships it: density and weight gradients, a filtered weight
    "ties": """
models:
  - model: {m0}
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: {m1}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: {m2}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
    # examples/bio-merge.yml
    "bio-merge": """
models:
  - model: {m0}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {m1}
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: {base}
parameters:
  normalize: false
  int8_mask: true
dtype: float16
""",
    # examples/gradient-slerp.yml: per-filter t gradients over the layers of a slice
    "gradient-slerp": """
slices:
  - sources:
      - model: {m0}
        layer_range: [0, 2]
      - model: {m1}
        layer_range: [0, 2]
merge_method: slerp
base_model: {m0}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float16
""",
    # examples/orcamini-platy-44layer.yml: layers stacked from two models (here 2 + 1 = 3 layers)
    "orcamini-platy-stack": """
slices:
  - sources:
    - model: {m0}
      layer_range: [0, 2]
  - sources:
    - model: {m1}
      layer_range: [1, 2]
merge_method: passthrough
dtype: float16
""",
}


def assert_same_merge(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype and ours[name].shape == expected.shape, name
        actual, wanted = ours[name].float(), expected.float()
        eps = torch.finfo(expected.dtype).eps
        allowed = eps * wanted.abs() + 8 * eps * wanted.abs().max()
        far = (actual - wanted).abs() > allowed
        assert not bool(far.any()), f"{name}: {int(far.sum())} of {far.numel()} elements differ"


# bf16 models merged in bf16: mergekit keeps the deltas tied at a threshold in the order its unstable
# argsort leaves and elects signs on bf16-rounded deltas; dtm keeps ties by flat index and computes in
# fp32, so ~0.25% of the elements differ by more than an ulp (measured: docs/merge.md)
BF16_TIES = pytest.mark.xfail(strict=True, reason="TIES of bf16 models: mergekit's tie order (unstable argsort) "
                                                   "and bf16 sign election (docs/merge.md, 'Where dtm differs')")
CASES = [pytest.param(example, family, marks=[BF16_TIES] if family == "bf16" and example in ("ties", "bio-merge") else [])
         for example in sorted(EXAMPLES) for family in ("fp32", "bf16")]


@pytest.mark.parametrize("example,family", CASES)
def test_mergekit_example_gives_mergekit_result(llama_family, tmp_path, example, family):
    paths = {name: str(path) for name, path in llama_family[family].items()}
    config = tmp_path / f"{example}.yml"
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[family]
    config.write_text(EXAMPLES[example].format(**paths).replace("dtype: float16", f"dtype: {dtype}"))
    run_mergekit(config, tmp_path / "mergekit")
    assert dtm(["merge", str(config), str(tmp_path / "dtm"), "--quiet"]) == 0
    assert_same_merge(load_state(tmp_path / "dtm"), load_state(tmp_path / "mergekit"))


def test_examples_are_not_trivial(llama_family, tmp_path):
    """The comparison can fail: one model's density 0.34 instead of 0.33 (one more element kept in
    a hundred) is caught."""
    paths = {name: str(path) for name, path in llama_family["fp32"].items()}
    text = EXAMPLES["ties"].format(**paths).replace("dtype: float16", "dtype: float32")
    config = tmp_path / "ties.yml"
    config.write_text(text)
    run_mergekit(config, tmp_path / "mergekit")
    changed = tmp_path / "changed.yml"
    changed.write_text(text.replace("density: 0.33", "density: 0.34"))
    assert dtm(["merge", str(changed), str(tmp_path / "dtm"), "--quiet"]) == 0
    with pytest.raises(AssertionError, match="elements differ"):
        assert_same_merge(load_state(tmp_path / "dtm"), load_state(tmp_path / "mergekit"))
