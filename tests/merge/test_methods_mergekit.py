"""Each method run through mergekit-yaml and dtm merge on the same config (tiny Llama models, fp32):
the outputs agree within 1 ulp, every element. dtm's coefficients come from float64 statistics and
mergekit's from fp32 ones (torch's summation order), so where the combination cancels (an output
much smaller than its inputs) the 1 ulp is that of the largest input magnitude at the element:
the rounding of a coefficient moves an output by that much, however small the output."""

from __future__ import annotations

import pytest

from conftest import load_state, run_mergekit
from dtm_fast.cli import main as dtm
import torch

# mergekit's slerp coefficients carry several fp32 roundings of an angle (its dot product summed in
# torch's order); the 1 ulp rounding of each coefficient then shows twice in c_a a + c_b b
ULPS = {"slerp": 2}
# method -> (base_model given, merge parameters, per-model parameters, models)
CONFIGS = {
    "slerp": (True, {"t": 0.3}, [{}], 1),
    "slerp_t_gradient": (True, {"t": [0.0, 0.5, 1.0]}, [{}], 1),
    "model_stock": (True, {}, [{}] * 3, 3),
    "model_stock_filter_wise": (True, {"filter_wise": True}, [{}] * 3, 3),
}


def yaml_text(paths, method: str, base: bool, shared: dict, per_model: list[dict], count: int) -> str:
    lines = [f"merge_method: {method}", "dtype: float32"]
    if base:
        lines.append(f"base_model: {paths['base']}")
    if shared:
        lines.append(f"parameters: {shared}")
    lines.append("models:")
    for index in range(count):
        lines.append(f"  - model: {paths[f'm{index}']}")
        if per_model[index]:
            lines.append(f"    parameters: {per_model[index]}")
    return "\n".join(lines) + "\n"


def one_ulp(values: torch.Tensor) -> torch.Tensor:
    magnitude = values.abs()
    return torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))) - magnitude


def run_both(paths, tmp_path, method: str, base: bool, shared: dict, per_model: list[dict], count: int):
    config = tmp_path / "merge.yml"
    config.write_text(yaml_text(paths, method, base, shared, per_model, count))
    run_mergekit(config, tmp_path / "mergekit")
    assert dtm(["merge", str(config), str(tmp_path / "dtm"), "--quiet"]) == 0
    inputs = [load_state(paths["base"])] if base else []
    inputs += [load_state(paths[f"m{index}"]) for index in range(count)]
    return load_state(tmp_path / "mergekit"), load_state(tmp_path / "dtm"), inputs


def assert_within_ulps(theirs: dict, ours: dict, inputs: list[dict], ulps: int = 1) -> None:
    assert theirs.keys() == ours.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        largest = torch.stack([ours[name].abs(), theirs[name].abs(), *(i[name].abs() for i in inputs)]).amax(0)
        error = (ours[name] - theirs[name]).abs()
        assert bool((error <= ulps * one_ulp(largest)).all()), f"{name}: {float((error / one_ulp(largest)).max()):.1f} ulp"


@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_mergekit_config_gives_mergekits_result(llama_family, tmp_path, case):
    base, shared, per_model, count = CONFIGS[case]
    method = case.split("_filter")[0].split("_t_")[0]
    theirs, ours, inputs = run_both(llama_family["fp32"], tmp_path, method, base, shared, per_model, count)
    assert_within_ulps(theirs, ours, inputs, ULPS.get(method, 1))
