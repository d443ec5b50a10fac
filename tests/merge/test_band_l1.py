"""TIES and breadcrumbs with `rescale: l1` (merge/band_l1.py): the L1 sums are taken in the pass that
finds the thresholds, so a tensor larger than the budget's chunk is read twice (not three times);
where that pass cannot give them (brackets that miss), a pass of their own does. Both equal the
in-memory reference bit for bit, and the reference equals mergekit's sparsify on small tied tensors.
Where a bound splits its ties, the combine locates the split itself (bands.ChunkRules)."""

from __future__ import annotations

import pytest
import torch

from conftest import load_state, tied_bf16_family
from dtm_fast.merge import band_l1, magnitude, stream
from test_exact_thresholds import reference as whole_tensor_reference, small_tied_case
from test_one_read import MAX_MEMORY, SHAPE, merge, need_cpu, reference, same_bits

CASES = [
    ("ties", [{"density": 0.5}, {"density": 0.3}, {"density": 0.7}], {}),
    ("ties", [{"density": 0.4}, {"density": 0.6}, {"density": 0.2}], {"threshold_ties": "all"}),
    ("breadcrumbs_ties", [{"density": 0.4, "gamma": 0.05}, {"density": 0.2, "gamma": 0.3}, {"density": 0.6}], {}),
    ("breadcrumbs", [{"density": 0.3, "gamma": 0.1}, {"density": 0.5, "gamma": 0.02}, {"density": 0.45}],
     {"threshold_ties": "all"}),
]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """bf16 fine-tunes of one 2.1M-element tensor whose deltas tie a lot at every threshold."""
    return tied_bf16_family(tmp_path_factory.mktemp("band-l1"), SHAPE, seed=21)


@pytest.fixture
def reads(monkeypatch):
    """Elements of "w" read from the inputs, and how the L1 sums were taken."""
    seen = {"elements": 0, "shared": 0, "own_pass": 0}
    read, shared, own_pass = stream.TensorStream.read, band_l1.thresholds_and_sums, band_l1.bounds_then_sums

    def counting_read(self, slot, start, stop):
        if self.context.name == "w":
            seen["elements"] += stop - start
        return read(self, slot, start, stop)

    def counted_shared(*args):
        found = shared(*args)
        seen["shared"] += found is not None
        return found

    def counted_own_pass(*args):
        seen["own_pass"] += 1
        return own_pass(*args)

    monkeypatch.setattr(stream.TensorStream, "read", counting_read)
    monkeypatch.setattr(band_l1, "thresholds_and_sums", counted_shared)
    monkeypatch.setattr(band_l1, "bounds_then_sums", counted_own_pass)
    return seen


def merged_with(family, out, method, per_model, extra, backend="cpu", max_memory=MAX_MEMORY):
    from dtm_fast.merge.config import MergeConfig, ModelInput
    from dtm_fast.merge.engine import run_merge

    config = MergeConfig(method=method, models=tuple(ModelInput(p, d) for p, d in zip(family[1:], per_model)),
                         output=out, base=family[0], backend=backend, max_memory=max_memory,
                         parameters={"rescale": "l1", **extra})
    run_merge(config)
    return load_state(out)["w"], config


def reference_of(family, config) -> torch.Tensor:
    from dtm_fast.merge.methods import METHODS
    from dtm_fast.merge.methods.base import TensorContext

    tensors = [load_state(p)["w"] for p in family]
    return METHODS[config.method].reference(config.tensor_params("w", None, None), tensors[0], tensors[1:],
                                            TensorContext("w", SHAPE, 0)).bfloat16()


@pytest.mark.parametrize("method,per_model,extra", CASES, ids=[f"{m}-{e.get('threshold_ties', 'index')}" for m, _, e in CASES])
def test_over_budget_tensor_is_read_twice_and_equals_the_reference(family, tmp_path, reads, method, per_model, extra):
    need_cpu()
    out, config = merged_with(family, tmp_path / "out", method, per_model, extra)
    assert reads == {"elements": 2 * SHAPE[0] * SHAPE[1], "shared": 1, "own_pass": 0}
    assert same_bits(out, reference_of(family, config))


def test_the_reference_backend_takes_the_same_two_reads(family, tmp_path, reads):
    method, per_model, extra = CASES[0]
    out, config = merged_with(family, tmp_path / "out", method, per_model, extra, backend="reference",
                              max_memory=128 * 2**20)  # its torch temporaries take ~160 bytes per chunk element
    assert reads["elements"] == 2 * SHAPE[0] * SHAPE[1] and reads["shared"] == 1
    assert same_bits(out, reference_of(family, config))


def test_brackets_that_miss_take_the_sums_in_a_pass_of_their_own(family, tmp_path, reads, monkeypatch):
    need_cpu()
    monkeypatch.setattr(magnitude, "bracket", lambda sample, rank, numel: (0, 0))  # every rank lies above it
    method, per_model, extra = CASES[0]
    out, config = merged_with(family, tmp_path / "out", method, per_model, extra)
    assert reads["shared"] == 0 and reads["own_pass"] == 1
    assert same_bits(out, reference_of(family, config))


def test_the_l1_scale_changes_the_output(family, tmp_path):
    """A guard on the tests above: without the rescale the same merge gives other bytes."""
    need_cpu()
    method, per_model, extra = CASES[0]
    scaled, _ = merged_with(family, tmp_path / "l1", method, per_model, extra)
    plain = merge(family, tmp_path / "none", method, per_model)
    assert not same_bits(scaled, plain) and same_bits(plain, reference(family, method, per_model))


@pytest.mark.parametrize("seed", range(12))
def test_small_tied_tensors_match_mergekits_l1_rescaled_sparsification(seed):
    sparsify = pytest.importorskip("mergekit.sparsify")
    delta, density, base = small_tied_case(seed)
    l1 = sparsify.RescaleNorm.l1
    ties = whole_tensor_reference("ties", base, [delta], {"rescale": "l1"}, [{"density": density}])
    torch.testing.assert_close(ties, sparsify.magnitude(delta, density, rescale_norm=l1), rtol=2**-23, atol=0)
    crumbs = whole_tensor_reference("breadcrumbs", base, [delta], {"rescale": "l1"}, [{"density": density, "gamma": 0.15}])
    expected = sparsify.magnitude_outliers(delta, density, gamma=0.15, rescale_norm=l1)
    torch.testing.assert_close(crumbs, expected, rtol=2**-23, atol=0)


@pytest.mark.parametrize("forced_miss", [False, True], ids=["shared-pass", "own-pass"])
@pytest.mark.parametrize("case", [0, 2], ids=["ties", "breadcrumbs_ties"])
def test_the_scales_are_mergekits_on_the_whole_tensor(family, tmp_path, monkeypatch, case, forced_miss):
    """An oracle independent of dtm's sums: mergekit's own sparsification of each whole task vector.
    (Its sort may keep other elements among equal magnitudes on a tensor this large; the L1 sums
    do not depend on which.)"""
    need_cpu()
    sparsify = pytest.importorskip("mergekit.sparsify")
    from dtm_fast.merge.methods.gta import GeneralizedTaskArithmetic

    method, per_model, extra = CASES[case]
    used = []
    scales = GeneralizedTaskArithmetic._scales
    monkeypatch.setattr(GeneralizedTaskArithmetic, "_scales", lambda *args: used.append(scales(*args)) or used[-1])
    if forced_miss:
        monkeypatch.setattr(magnitude, "bracket", lambda sample, rank, numel: (0, 0))
    merged_with(family, tmp_path / "out", method, per_model, extra)
    tensors = [load_state(p)["w"].float() for p in family]
    expected = []
    for model, params in zip(tensors[1:], per_model):
        delta = model - tensors[0]
        if method == "ties":
            kept = sparsify.magnitude(delta, params["density"])
        else:
            kept = sparsify.magnitude_outliers(delta, params["density"], gamma=params.get("gamma", 0.01))
        expected.append(float(delta.abs().double().sum() / kept.abs().double().sum()))
    assert len(used) == 1
    assert used[0] == pytest.approx(expected, rel=1e-12)
