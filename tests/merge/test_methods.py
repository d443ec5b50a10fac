"""Every merge method: the streaming engine (many chunks, reused buffers) equals the method's
whole-tensor reference, and the references equal hand-computed values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import load_state, write_safetensors
from dtm_fast.merge.config import MergeConfig, ModelInput
from dtm_fast.merge.engine import run_merge
from dtm_fast.merge.methods import METHODS
from dtm_fast.merge.methods.base import TensorContext

# odd shapes, several larger than one 4096-element chunk
SHAPES = {"a.weight": (37, 301), "b.weight": (4099,), "c.weight": (3, 5), "d.bias": (1,), "e.weight": (129, 67)}
CASES = {
    "linear": {"parameters": {}, "per_model": [{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}]},
    "task_arithmetic": {"parameters": {"lambda": 0.7}, "per_model": [{"weight": 1.0}, {"weight": -0.5}, {"weight": 0.3}]},
    "ties": {"parameters": {}, "per_model": [{"density": 0.3}, {"density": 0.5}, {"density": 1.0}]},
    "dare_linear": {"parameters": {}, "per_model": [{"density": 0.4}, {"density": 0.6}, {"density": 0.9}]},
    "dare_ties": {"parameters": {"rescale": "l1"}, "per_model": [{"density": 0.4}, {"density": 0.6}, {"density": 0.5}]},
    "breadcrumbs": {"parameters": {}, "per_model": [{"density": 0.5, "gamma": 0.05}] * 3},
    "breadcrumbs_ties": {"parameters": {"normalize": True}, "per_model": [{"density": 0.3, "gamma": 0.1}] * 3},
    "slerp": {"parameters": {"t": 0.3}, "per_model": [{}]},
    "model_stock": {"parameters": {}, "per_model": [{}] * 3},
    "model_stock_rows": {"parameters": {"filter_wise": True}, "per_model": [{}] * 3},
    "fisher": {"parameters": {"epsilon": 1e-6}, "per_model": [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}]},
    "passthrough": {"parameters": {}, "per_model": [{"scale": 0.5}]},
    "nearswap": {"parameters": {"t": 0.05}, "per_model": [{}]},
    "ram": {"parameters": {"epsilon": 0.05}, "per_model": [{}] * 3},
    "ramplus_tl": {"parameters": {"epsilon": 0.05, "r": 0.5, "alpha": 0.3}, "per_model": [{}] * 3},
    "sce": {"parameters": {}, "per_model": [{}] * 3},
    "nuslerp": {"parameters": {}, "per_model": [{"weight": 1.0}, {"weight": 2.0}]},
    "multislerp": {"parameters": {}, "per_model": [{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}]},
    "karcher": {"parameters": {}, "per_model": [{}] * 3},
    "arcee_fusion": {"parameters": {}, "per_model": [{}]},
    "sce_topk": {"parameters": {"select_topk": 0.3}, "per_model": [{}] * 3},
    "nuslerp_rows": {"parameters": {"nuslerp_flatten": False}, "per_model": [{"weight": 1.0}, {"weight": 2.0}]},
    "nuslerp_columns": {"parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                        "per_model": [{"weight": 1.0}, {"weight": 2.0}]},
}
CASE_METHODS = {"model_stock_rows": "model_stock", "sce_topk": "sce", "nuslerp_rows": "nuslerp",
                "nuslerp_columns": "nuslerp"}
# whole-tensor statistics summed per chunk in float64 (norms, Gram matrices, L1 sums): <= 1 ulp
STATISTICS = ("model_stock", "dare_ties", "slerp", "model_stock_rows", "sce", "nuslerp", "multislerp", "karcher",
              "sce_topk", "nuslerp_columns")
# A method whose chunks hold whole vectors needs one of 4099 elements (b.weight): the smallest budgets
# that give it, so that a.weight (11,137 elements) still streams in two chunks (17 MiB: chunks of 4096)
MEMORY = {"model_stock_rows": 24 * 2**20, "arcee_fusion": 18 * 2**20, "nuslerp_rows": 35 * 2**19,
          "nuslerp_columns": 35 * 2**19}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two same-dtype tensors."""
    if a.numel() == 0:
        return 0
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    ia, ib = a.view(bits).to(torch.int64), b.view(bits).to(torch.int64)
    sign = 1 << (torch.iinfo(bits).bits - 1)
    ia = torch.where(ia < 0, -(ia + sign), ia)  # map sign-magnitude to a monotonic integer line
    ib = torch.where(ib < 0, -(ib + sign), ib)
    return int((ia - ib).abs().max())


@pytest.fixture(scope="module")
def raw_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    generator = torch.Generator().manual_seed(7)
    base = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    paths = {}
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        paths[f"base-{tag}"] = write_safetensors(root / f"base-{tag}" / "model.safetensors",
                                                 {k: v.to(dtype) for k, v in base.items()}).parent
        for index in range(3):
            model = {k: (v + 0.1 * torch.randn(v.shape, generator=generator)).to(dtype) for k, v in base.items()}
            paths[f"m{index}-{tag}"] = write_safetensors(root / f"m{index}-{tag}" / "model.safetensors", model).parent
            fisher = {k: torch.rand(v.shape, generator=generator) ** 3 for k, v in base.items()}
            write_safetensors(root / f"m{index}-{tag}" / "fisher.safetensors", fisher)
    return paths


def merge_config(paths, case_name: str, tag: str, output: Path, max_memory: int, backend="reference"):
    case = CASES[case_name]
    method = CASE_METHODS.get(case_name, case_name)
    models = tuple(ModelInput(paths[f"m{i}-{tag}"], dict(case["per_model"][i])) for i in range(len(case["per_model"])))
    return MergeConfig(method=method, models=models, output=output, base=paths[f"base-{tag}"],
                       parameters=dict(case["parameters"]), max_memory=max_memory, backend=backend, seed=11)


@pytest.mark.parametrize("tag", ["fp32", "bf16"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_streaming_equals_reference(raw_family, tmp_path, case_name, tag):
    memory = MEMORY.get(case_name, 17 * 2**20)
    config = merge_config(raw_family, case_name, tag, tmp_path / "out", max_memory=memory)
    run_merge(config)
    merged = load_state(tmp_path / "out")
    base = load_state(raw_family[f"base-{tag}"])
    models = [load_state(m.path) for m in config.models]
    from safetensors.torch import load_file

    fishers = [load_file(str(m.path / "fisher.safetensors")) for m in config.models]
    method = METHODS[config.method]
    for name, value in merged.items():
        params = config.tensor_params(name, None, None)
        expected = method.reference(params, base[name], [m[name] for m in models], TensorContext(name, value.shape, 11),
                                    [f[name] for f in fishers]).to(value.dtype)
        assert value.shape == expected.shape
        tolerance = 1 if case_name in STATISTICS else 0
        assert ulp_distance(value, expected) <= tolerance, name


@pytest.mark.parametrize("case_name", ["ties", "dare_ties", "breadcrumbs", "slerp", "model_stock"])
def test_chunked_output_is_byte_identical_to_unchunked(raw_family, tmp_path, case_name):
    small = merge_config(raw_family, case_name, "bf16", tmp_path / "small", max_memory=17 * 2**20)
    large = merge_config(raw_family, case_name, "bf16", tmp_path / "large", max_memory=512 * 2**20)
    run_merge(small)
    run_merge(large)
    assert (tmp_path / "small" / "model.safetensors").read_bytes() == (tmp_path / "large" / "model.safetensors").read_bytes()


def reference(method: str, base, models, params: dict, per_model: list[dict], fishers=()):
    """The method's whole-tensor reference with parameters resolved as for a real merge."""
    config = MergeConfig(method=method, models=tuple(ModelInput(Path(f"m{i}"), p) for i, p in enumerate(per_model)),
                         output=Path("out"), base=Path("base"), parameters=params)
    resolved = config.tensor_params("t", None, None)
    return METHODS[method].reference(resolved, base, models, TensorContext("t", tuple(models[0].shape), 0), fishers)


def test_ties_hand_computed():
    base = torch.zeros(4)
    m1 = torch.tensor([3.0, -2.0, 1.0, 0.5])
    m2 = torch.tensor([-1.0, -4.0, 2.0, 0.1])
    # density 0.5 keeps two per model: m1 -> [3, -2, 0, 0], m2 -> [0, -4, 2, 0]; signs of sums +, -, +, (0: +)
    result = reference("ties", base, [m1, m2], {}, [{"density": 0.5}, {"density": 0.5}])
    assert torch.equal(result, torch.tensor([3.0, -3.0, 2.0, 0.0]))


def test_ties_keeps_every_element_tied_at_the_threshold():
    base = torch.zeros(6)
    model = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 0.1])
    # k = 2 but three elements share the 2nd-largest magnitude: all three are kept
    result = reference("ties", base, [model], {"threshold_ties": "all"}, [{"density": 0.4}])
    assert torch.equal(result, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))


def test_linear_and_task_arithmetic_hand_computed():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert torch.equal(reference("linear", a, [a, b], {}, [{"weight": 1.0}, {"weight": 3.0}]), torch.tensor([2.5, 5.0]))
    base = torch.tensor([1.0, 1.0])
    result = reference("task_arithmetic", base, [a, b], {"lambda": 0.5}, [{"weight": 1.0}, {"weight": 1.0}])
    assert torch.allclose(result, torch.tensor([1.0 + 0.5 * (0 + 2), 1.0 + 0.5 * (1 + 5)]))


def test_breadcrumbs_band_hand_computed():
    base = torch.zeros(10)
    model = torch.arange(1.0, 11.0)  # magnitudes 1..10
    # gamma 0.1 drops the largest (10); density 0.5 keeps the next five: 9, 8, 7, 6, 5
    result = reference("breadcrumbs", base, [model], {}, [{"density": 0.5, "gamma": 0.1}])
    expected = torch.tensor([0, 0, 0, 0, 5, 6, 7, 8, 9, 0.0])
    assert torch.equal(result, expected)


def test_dare_keeps_density_fraction_and_rescales():
    base = torch.zeros(200_000)
    model = torch.ones(200_000)
    result = reference("dare_linear", base, [model], {}, [{"density": 0.25}])
    kept = result != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.005
    assert torch.all(result[kept] == 4.0)  # 1 / density


def test_slerp_matches_the_great_circle():
    # orthogonal unit rows: slerp at t is cos(t*pi/2) a + sin(t*pi/2) b
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    result = reference("slerp", a, [b], {"t": 1 / 3}, [{}])
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    assert torch.allclose(result, torch.tensor([[c, s], [2 * s, 2 * c]]), atol=1e-6)


def test_model_stock_ratio_hand_computed():
    # deltas at 60 degrees (cos 0.5), K = 2: t = 2 * 0.5 / (1 + 0.5) = 2/3
    base = torch.zeros(2)
    m1 = torch.tensor([1.0, 0.0])
    m2 = torch.tensor([0.5, math.sqrt(3) / 2])
    result = reference("model_stock", base, [m1, m2], {}, [{}, {}])
    assert torch.allclose(result, (m1 + m2) / 2 * (2 / 3), atol=1e-6)


def test_fisher_hand_computed():
    m1, m2 = torch.tensor([0.0, 4.0]), torch.tensor([2.0, 0.0])
    f1, f2 = torch.tensor([3.0, 0.0]), torch.tensor([1.0, 0.0])
    result = reference("fisher", None, [m1, m2], {"epsilon": 1e-8}, [{}, {}], [f1, f2])
    # element 0: (3*0 + 1*2) / 4 = 0.5; element 1: Fisher zero everywhere -> plain average 2
    assert torch.allclose(result, torch.tensor([0.5, 2.0]))


NEW_METHODS = ["passthrough", "nearswap", "ram", "ramplus_tl", "sce", "nuslerp", "multislerp", "karcher", "slerp",
               "arcee_fusion", "sce_topk", "nuslerp_rows", "nuslerp_columns"]


@pytest.mark.parametrize("case_name", NEW_METHODS)
def test_cpu_backend_equals_the_reference_backend(raw_family, tmp_path, case_name):
    from dtm_fast.merge.backends import native

    if native.unavailable_reason():
        pytest.skip(native.unavailable_reason())
    for backend in ("reference", "cpu"):
        run_merge(merge_config(raw_family, case_name, "bf16", tmp_path / backend, MEMORY.get(case_name, 17 * 2**20),
                               backend=backend))
    ours, reference = load_state(tmp_path / "cpu"), load_state(tmp_path / "reference")
    for name, value in ours.items():
        assert ulp_distance(value, reference[name]) <= (1 if case_name in STATISTICS else 0), name


def test_arcee_fusion_hand_computed():
    # rows [a, -a] of a base at zero: every element's importance is |a| * KL(softmax([a, -a]) || uniform)
    # (+ 1e-8 each): sorted 0, 0, i(0.1) x2, i(0.2) x2, i(3) x2; positions floor(q * 7) = 1, 3, 5 give
    # q1 = 0, median = i(0.1), q3 = i(0.2); only i(3) reaches i(0.1) + 1.5 i(0.2), so only that row moves
    base = torch.zeros(4, 2)
    model = torch.tensor([[0.0, 0.0], [0.1, -0.1], [0.2, -0.2], [3.0, -3.0]])
    result = reference("arcee_fusion", base, [model], {}, [{}])
    assert torch.equal(result, torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [3.0, -3.0]]))


def test_sce_select_topk_hand_computed():
    # variances across the three deltas: 0, 2/3, 2, 0.0022, 2, 0 -> 4 non-zero
    base = torch.zeros(6)
    models = [torch.tensor([1.0, 1.0, 3.0, 0.1, 2.0, 0.0]), torch.tensor([1.0, -1.0, 0.0, 0.0, 2.0, 0.0]),
              torch.tensor([1.0, 0.0, 0.0, 0.0, -1.0, 0.0])]
    # k = int(4 * 0.5) = 2: elements 2 and 4 keep their deltas; the signs agree with +3 and +3
    kept = reference("sce", base, models, {"select_topk": 0.5}, [{}] * 3)
    assert torch.allclose(kept, torch.tensor([0.0, 0.0, 3.0, 0.0, 2.0, 0.0]))
    # k = 1 with elements 2 and 4 tied at variance 2: the lower flat index is kept
    tied = reference("sce", base, models, {"select_topk": 0.25}, [{}] * 3)
    assert torch.allclose(tied, torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0, 0.0]))
    assert torch.equal(reference("sce", base, models, {"select_topk": 0.0}, [{}] * 3), base)


def test_nuslerp_per_row_and_per_column_hand_computed():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weights = [{"weight": 1.0}, {"weight": 1.0}]  # t = 0.5
    s = math.sin(math.pi / 4)
    # rows: the first pair is colinear (linear), the second orthogonal
    rows = reference("nuslerp", None, [a, b], {"nuslerp_flatten": False}, weights)
    assert torch.allclose(rows, torch.tensor([[1.0, 0.0], [s, s]]), atol=1e-6)
    # columns: [1, 1] and [1, 0] are 45 degrees apart; [0, 0] and [0, 1] orthogonal (a zero vector's cosine is 0)
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    columns = reference("nuslerp", None, [a, b], {"nuslerp_flatten": False, "nuslerp_row_wise": True}, weights)
    assert torch.allclose(columns, torch.tensor([[2 * c, 0.0], [c, s]]), atol=1e-6)
