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

# mergekit computes these in fp32 step by step (norms and dot products summed in torch's order,
# unit vectors, tangents, each rounded), and lands a few ulps from its own float64 result; dtm takes
# float64 statistics and one fp32 combine, and is closer to that result than mergekit's fp32 output
# (test_closer_to_mergekits_float64_result). The bounds are what these tiny models measure.
# bounds measured on these models, in ulps of the larger input's magnitude; where one is above 1, the
# test below shows dtm is the closer of the two to mergekit's own float64 result
ULPS = {"slerp": 2, "sce": 6, "nuslerp": 6, "multislerp": 8, "karcher": 6, "model_stock_filter_wise": 3,
        "nuslerp_rows": 1, "nuslerp_rows_without_base": 1}
# method -> (base_model given, merge parameters, per-model parameters, models)
CONFIGS = {
    "slerp": (True, {"t": 0.3}, [{}], 1),
    "slerp_t_gradient": (True, {"t": [0.0, 0.5, 1.0]}, [{}], 1),
    "model_stock": (True, {}, [{}] * 3, 3),
    "model_stock_filter_wise": (True, {"filter_wise": True}, [{}] * 3, 3),
    "passthrough": (False, {}, [{"scale": 0.7}], 1),
    "nearswap": (True, {"t": 0.01}, [{}], 1),
    "ram": (True, {"epsilon": 0.01}, [{}] * 3, 3),
    "ramplus_tl": (True, {"epsilon": 0.01, "r": 0.5, "alpha": 0.4}, [{}] * 3, 3),
    "sce": (True, {}, [{}] * 3, 3),
    "nuslerp": (True, {}, [{"weight": 1.0}, {"weight": 3.0}], 2),
    "nuslerp_without_base": (False, {}, [{"weight": 1.0}, {"weight": 0.5}], 2),
    "multislerp": (True, {}, [{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}], 3),
    "multislerp_without_base": (False, {"normalize_weights": False}, [{"weight": 0.3}, {"weight": 0.2}], 2),
    "karcher": (False, {}, [{}] * 3, 3),
    "karcher_with_base": (True, {"max_iter": 3}, [{}] * 2, 2),
    "arcee_fusion": (True, {}, [{}], 1),
    "sce_select_topk_0.5": (True, {"select_topk": 0.5}, [{}] * 3, 3),
    "sce_select_topk_0.3": (True, {"select_topk": 0.3}, [{}] * 3, 3),
    "nuslerp_rows": (True, {"nuslerp_flatten": False}, [{"weight": 1.0}, {"weight": 3.0}], 2),
    "nuslerp_rows_without_base": (False, {"nuslerp_flatten": False}, [{"weight": 1.0}, {"weight": 0.5}], 2),
    "nuslerp_columns": (True, {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                        [{"weight": 1.0}, {"weight": 3.0}], 2),
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
    worst = {}
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        largest = torch.stack([ours[name].abs(), theirs[name].abs(), *(i[name].abs() for i in inputs)]).amax(0)
        worst[name] = float(((ours[name] - theirs[name]).abs() / one_ulp(largest)).max())
    assert max(worst.values()) <= ulps, {name: value for name, value in worst.items() if value > ulps}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_mergekit_config_gives_mergekits_result(llama_family, tmp_path, case):
    base, shared, per_model, count = CONFIGS[case]
    method = method_of(case)
    theirs, ours, inputs = run_both(llama_family["fp32"], tmp_path, method, base, shared, per_model, count)
    assert_within_ulps(theirs, ours, inputs, ULPS.get(case, ULPS.get(method, 1)))


def method_of(case: str) -> str:
    """The method a case runs: the longest method name the case's name starts with."""
    from dtm_fast.merge.methods import METHODS

    return max((name for name in METHODS if case == name or case.startswith(name + "_")), key=len)


@pytest.mark.parametrize("case", ["slerp", "nuslerp", "multislerp", "karcher", "sce", "model_stock_filter_wise",
                                  "nuslerp_columns"])
def test_closer_to_mergekits_float64_result(llama_family, tmp_path, case):
    """mergekit computing in float64 (dtype: float64, out_dtype: float32) is the definition rounded
    once; dtm's fp32 output is, tensor by tensor, at most as far from it as mergekit's fp32 output
(give or take one ulp: a tensor both get nearly right, such as a norm's weights)."""
    base, shared, per_model, count = CONFIGS[case]
    paths = llama_family["fp32"]
    theirs, ours, inputs = run_both(paths, tmp_path, method_of(case), base, shared, per_model, count)
    exact_config = tmp_path / "float64.yml"
    exact_config.write_text(yaml_text(paths, method_of(case), base, shared, per_model, count).replace(
        "dtype: float32", "dtype: float64\nout_dtype: float32"))
    run_mergekit(exact_config, tmp_path / "float64")
    exact = load_state(tmp_path / "float64")
    for name in ours:
        ours_error = float((ours[name].double() - exact[name].double()).abs().max())
        theirs_error = float((theirs[name].double() - exact[name].double()).abs().max())
        slack = float(one_ulp(exact[name].abs().amax()))
        assert ours_error <= theirs_error + slack, f"{name}: dtm {ours_error:.3g} from the float64 result, mergekit {theirs_error:.3g}"


@pytest.mark.parametrize("case", ["arcee_fusion", "sce_select_topk_0.5", "nuslerp_rows", "nuslerp_columns"])
def test_bf16_models_merged_in_fp32_give_mergekits_result(llama_family, tmp_path, case):
    """bf16 inputs, mergekit computing in fp32 (dtype: float32, out_dtype: bfloat16), which is what
    dtm does for any dtype: equal within 1 ulp of the bf16 output."""
    base, shared, per_model, count = CONFIGS[case]
    paths = llama_family["bf16"]
    config = tmp_path / "merge.yml"
    config.write_text(yaml_text(paths, method_of(case), base, shared, per_model, count).replace(
        "dtype: float32", "dtype: float32\nout_dtype: bfloat16"))
    run_mergekit(config, tmp_path / "mergekit")
    assert dtm(["merge", str(config), str(tmp_path / "dtm"), "--quiet"]) == 0
    inputs = ([load_state(paths["base"])] if base else []) + [load_state(paths[f"m{i}"]) for i in range(count)]
    theirs, ours = load_state(tmp_path / "mergekit"), load_state(tmp_path / "dtm")
    if method_of(case) == "sce":
        # bf16 deltas tie in variance (the norms' deltas are multiples of 2^-7): where the k-th variance's
        # ties do not all fit, dtm keeps the lowest indices, torch.topk others (docs/merge.md); only
        # those elements may differ, by a whole delta
        for name in ours:
            split = split_ties(inputs[0][name], [i[name] for i in inputs[1:]], shared["select_topk"])
            ours[name] = torch.where(split, theirs[name], ours[name])
    assert_within_ulps(theirs, ours, inputs)


def split_ties(base, models, select_topk: float) -> torch.Tensor:
    """The elements tied at sce's k-th largest variance when not all of them are selected."""
    variance = torch.var(torch.stack([m.float() - base.float() for m in models]), dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * select_topk)
    if k == 0:
        return torch.zeros_like(variance, dtype=torch.bool)
    kth = torch.sort(variance.reshape(-1), descending=True).values[k - 1]
    tied = variance == kth
    return tied if int((variance > kth).sum()) + int(tied.sum()) > k else torch.zeros_like(tied)


def test_arcee_fusion_is_not_trivial(llama_family, tmp_path):
    """Some deltas are kept and some are not in most tensors, so the mask is really compared."""
    theirs, _, inputs = run_both(llama_family["fp32"], tmp_path, "arcee_fusion", *CONFIGS["arcee_fusion"])
    base = inputs[0]
    moved = {name: theirs[name] != base[name] for name in theirs}
    mixed = [name for name, changed in moved.items() if changed.any() and not changed.all()]
    assert len(mixed) >= len(theirs) // 2, sorted(set(theirs) - set(mixed))
