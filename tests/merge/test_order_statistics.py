"""Exact order statistics of streamed tensors (merge/order_statistics.py): arcee_fusion's quartiles
and sce's top-k variance, computed chunk by chunk within a small --max-memory, equal the whole-tensor
definitions (torch.quantile, a stable sort) on tensors larger than one chunk."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from conftest import BIG_SHAPE, load_state, write_safetensors
from dtm_fast.merge.config import MergeConfig, ModelInput
from dtm_fast.merge.engine import run_merge
from dtm_fast.merge.methods import METHODS
from dtm_fast.merge.methods.base import TensorContext
from dtm_fast.merge.order_statistics import key_value, order_keys

# over mergekit's 10^6-element sampling threshold, and n - 1 not a multiple of 4 (positions truncate)
ARCEE_SHAPE = (1031, 1033)


def test_order_keys_order_like_torch_sort():
    values = torch.tensor([3.0, -0.0, 0.0, float("-inf"), 1e-45, -1e-45, float("inf"), -2.5, 7e-39, -7e-39,
                           float("nan"), -float("nan"), 1.0, -1.0])
    keys = order_keys(values)
    finite = ~torch.isnan(values)
    assert torch.equal(values[finite][torch.argsort(keys[finite], stable=True)], torch.sort(values[finite]).values)
    assert bool((keys[~finite] > keys[finite].max()).all())  # NaN of either sign above +inf
    assert keys[1] == keys[2]  # -0 is +0
    assert all(float(key_value(int(k))) == float(v) for k, v in zip(keys[finite], values[finite]))


def streamed_merge(tmp_path, caplog, method: str, paths, parameters: dict, budget: int, backend: str):
    """The merged tensors, and the chunk length the engine streamed with."""
    config = MergeConfig(method=method, models=tuple(ModelInput(p) for p in paths[1:]), output=tmp_path / "out",
                         base=paths[0], parameters=parameters, max_memory=budget, backend=backend)
    with caplog.at_level(logging.INFO, logger="dtm_fast.merge.engine"):
        run_merge(config)
    chunk = int(re.search(r"chunks of up to (\d+) elements", caplog.text).group(1))
    return load_state(tmp_path / "out"), chunk


def arcee_fusion_definition(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """mergekit's definition on the whole tensor, its quartiles exact (torch.quantile's "lower" rule is
    mergekit's index floor(q * (n - 1)), exact here in fp32)."""
    p = torch.softmax(model, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    importance = (model - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    q1, median, q3 = torch.quantile(importance.reshape(-1), torch.tensor([0.25, 0.5, 0.75]),
                                    interpolation="lower")
    return base + (model - base) * (importance >= median + 1.5 * (q3 - q1)).float()


@pytest.fixture(scope="module")
def arcee_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("arcee")
    generator = torch.Generator().manual_seed(21)
    base = torch.randn(ARCEE_SHAPE, generator=generator) * 0.02
    model = base + 1e-3 * torch.randn(ARCEE_SHAPE, generator=generator)
    model[:40] = base[:40]  # unchanged rows: importance exactly 0
    return [write_safetensors(root / name / "model.safetensors", {"w": tensor}).parent
            for name, tensor in (("base", base), ("model", model))]


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_arcee_fusion_streamed_takes_the_exact_quartiles(arcee_pair, tmp_path, caplog, backend):
    merged, chunk = streamed_merge(tmp_path, caplog, "arcee_fusion", arcee_pair, {}, 24 * 2**20, backend)
    base, model = (load_state(p)["w"] for p in arcee_pair)
    assert chunk < base.numel()  # streamed in several chunks
    assert torch.equal(merged["w"], arcee_fusion_definition(base, model))
    kept = merged["w"] != base
    assert 0 < int(kept.sum()) < kept.numel() // 4


def test_arcee_fusion_with_more_rows_than_a_chunk_has_elements(tmp_path, caplog):
    """Rows of two elements, more of them than a chunk holds elements: the rows' divergences do not
    fit the share the budget gives them, so each pass computes its chunk's again."""
    generator = torch.Generator().manual_seed(22)
    shape = (900_000, 2)
    base = torch.randn(shape, generator=generator)
    model = base + 0.5 * torch.randn(shape, generator=generator)
    paths = [write_safetensors(tmp_path / name / "model.safetensors", {"w": tensor}).parent
             for name, tensor in (("base", base), ("model", model))]
    merged, chunk = streamed_merge(tmp_path, caplog, "arcee_fusion", paths, {}, 24 * 2**20, "auto")
    assert chunk < shape[0]  # more rows than a chunk has elements
    assert torch.equal(merged["w"], arcee_fusion_definition(base, model))
    assert 0 < int((merged["w"] != base).sum()) < base.numel() // 2


def test_sce_select_topk_streamed_equals_the_stable_sort(bf16_big_family, tmp_path, caplog):
    """bf16 deltas: their variances repeat, and the k-th is tied with elements that are not kept."""
    merged, chunk = streamed_merge(tmp_path, caplog, "sce", bf16_big_family, {"select_topk": 0.3}, 20 * 2**20, "auto")
    tensors = [load_state(p)["w"] for p in bf16_big_family]
    assert chunk < tensors[0].numel()
    params = MergeConfig(method="sce", models=tuple(ModelInput(p) for p in bf16_big_family[1:]), output=tmp_path,
                         base=bf16_big_family[0], parameters={"select_topk": 0.3}).tensor_params("w", None, None)
    expected = METHODS["sce"].reference(params, tensors[0], tensors[1:], TensorContext("w", BIG_SHAPE, 0))
    assert torch.equal(merged["w"], expected.bfloat16())
    # the selection split a group of tied variances (so the tie rule was exercised)
    variance = torch.var(torch.stack([t.float() - tensors[0].float() for t in tensors[1:]]), dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(variance)) * 0.3)
    kth = torch.sort(variance.reshape(-1), descending=True).values[k - 1]
    assert int((variance > kth).sum()) < k < int((variance >= kth).sum())
