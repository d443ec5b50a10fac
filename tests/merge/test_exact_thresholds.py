"""TIES and breadcrumbs keep exactly k = density * n elements, as mergekit does: elements tied at a
threshold are kept by flat index, which is the choice mergekit's own sort makes (it is stable on its
test-sized tensors), on every backend and chunking; `threshold_ties: all` keeps every tie."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import load_state, write_safetensors
from dtm_fast.merge.config import MergeConfig, ModelInput
from dtm_fast.merge.engine import run_merge
from dtm_fast.merge.methods import METHODS
from dtm_fast.merge.methods.base import TensorContext


def reference(method: str, base, models, params: dict, per_model: list[dict]) -> torch.Tensor:
    config = MergeConfig(method=method, models=tuple(ModelInput(Path(f"m{i}"), p) for i, p in enumerate(per_model)),
                         output=Path("out"), base=Path("base"), parameters=params)
    resolved = config.tensor_params("t", None, None)
    return METHODS[method].reference(resolved, base, models, TensorContext("t", tuple(models[0].shape), 0))


def test_ties_keeps_exactly_k_with_the_lowest_indices_among_ties():
    model = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 0.1])
    # k = 2 of three elements tied at the threshold: the first two by index
    result = reference("ties", torch.zeros(6), [model], {}, [{"density": 0.4}])
    assert torch.equal(result, torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0]))


def test_breadcrumbs_keeps_the_band_mergekits_ascending_sort_keeps():
    model = torch.tensor([1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 0.5, 2.0, 2.0, 1.0])
    # n 10, density 0.4, gamma 0.1: the largest (3) is dropped, then the next four of six tied 2s
    result = reference("breadcrumbs", torch.zeros(10), [model], {}, [{"density": 0.4, "gamma": 0.1}])
    assert torch.equal(result, torch.tensor([0, 0, 0, 2, 2, 0, 0, 2, 2, 0.0]))


def small_tied_case(seed: int) -> tuple[torch.Tensor, float, torch.Tensor]:
    """(delta, density, zero base): at most 16 elements (torch's sort is stable up to 16, so
    mergekit's argsort keeps the lowest indices among ties), magnitudes of a few values."""
    generator = torch.Generator().manual_seed(seed)
    count = int(torch.randint(4, 17, (1,), generator=generator))
    delta = torch.randint(-3, 4, (count,), generator=generator).float() * 0.25
    density = float(torch.rand(1, generator=generator)) * 0.8 + 0.1
    return delta, density, torch.zeros(count)


@pytest.mark.parametrize("seed", range(12))
def test_small_tied_tensors_match_mergekits_sparsification(seed):
    sparsify = pytest.importorskip("mergekit.sparsify")
    delta, density, base = small_tied_case(seed)
    ties = reference("ties", base, [delta], {}, [{"density": density}])
    assert torch.equal(ties, sparsify.magnitude(delta, density)), (delta, density)
    gamma = 0.15
    crumbs = reference("breadcrumbs", base, [delta], {}, [{"density": density, "gamma": gamma}])
    assert torch.equal(crumbs, sparsify.magnitude_outliers(delta, density, gamma=gamma)), (delta, density)


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory):
    """bf16 models whose deltas take a handful of values: most magnitudes tie."""
    root = tmp_path_factory.mktemp("tied")
    generator = torch.Generator().manual_seed(8)
    shape = (517, 301)
    base = (torch.randint(-64, 64, shape, generator=generator).float() / 64).bfloat16()
    paths = [write_safetensors(root / "base" / "model.safetensors", {"w": base}).parent]
    for index in range(3):
        sign = torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
        step = sign * torch.randint(1, 3, shape, generator=generator).float() / 256  # never zero
        paths.append(write_safetensors(root / f"m{index}" / "model.safetensors",
                                       {"w": (base.float() + step).bfloat16()}).parent)
    return paths


@pytest.mark.parametrize("method,per_model", [
    ("ties", [{"density": 0.3}, {"density": 0.55}, {"density": 0.71}]),
    ("breadcrumbs_ties", [{"density": 0.4, "gamma": 0.05}, {"density": 0.2, "gamma": 0.3}, {"density": 0.6}]),
])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_streamed_exact_thresholds_equal_the_sorted_definition(tied_family, tmp_path, method, per_model, backend):
    """Small budgets split the tensor into many chunks, so ties straddle chunk boundaries."""
    config = MergeConfig(method=method, models=tuple(ModelInput(p, d) for p, d in zip(tied_family[1:], per_model)),
                         output=tmp_path / "out", base=tied_family[0], backend=backend, max_memory=17 * 2**20)
    run_merge(config)
    tensors = [load_state(p)["w"] for p in tied_family]
    expected = METHODS[method].reference(config.tensor_params("w", None, None), tensors[0], tensors[1:],
                                         TensorContext("w", tuple(tensors[0].shape), 0)).bfloat16()
    assert torch.equal(load_state(tmp_path / "out")["w"].view(torch.int16), expected.view(torch.int16))


def test_each_model_keeps_exactly_k_of_its_tied_deltas(tied_family):
    base, model = load_state(tied_family[0])["w"], load_state(tied_family[1])["w"]
    delta = model.float() - base.float()
    # few zero deltas (where bf16 rounding ate the step), far below the band: every kept delta shows; ties abound
    assert int((delta == 0).sum()) < delta.numel() // 100 and len(delta.abs().unique()) < 10
    k = int(0.37 * delta.numel())
    for method, extra, expected in (("ties", {}, k), ("breadcrumbs", {"gamma": 0.1}, k)):
        kept = reference(method, base, [model], {}, [{"density": 0.37, **extra}]).float() - base.float()
        assert int((kept != 0).sum()) == expected, method
        every_tie = reference(method, base, [model], {"threshold_ties": "all"}, [{"density": 0.37, **extra}])
        assert int((every_tie.float() - base.float() != 0).sum()) > k, method
