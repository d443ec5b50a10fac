"""DELLA / della_linear: the native MagPrune equals the reference bit for bit (masks and values), the
kept fraction follows the rank-scaled probabilities, streamed merges equal the whole-tensor
definition, and a mergekit config gives mergekit's result in distribution (mergekit draws its
masks with torch.bernoulli, so only statistics can be compared)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import load_state, run_mergekit, tied_bf16_family, write_safetensors
from dtm_fast.cli import main as dtm
from dtm_fast.merge import rng
from dtm_fast.merge.backends.reference import ReferenceBackend
from dtm_fast.merge.config import MergeConfig, ModelInput
from dtm_fast.merge.methods import METHODS
from dtm_fast.merge.methods.base import TensorContext
from tests.backends.conftest import cpu_isas

REFERENCE = ReferenceBackend()


@pytest.fixture(params=cpu_isas())
def cpu_backend(request):
    """The cpu backend running the kernels of each instruction set this CPU has (their Philox draws
    and sorts are written per instruction set)."""
    from dtm_fast.merge.backends import cpu, native

    if native.unavailable_reason():
        pytest.skip(native.unavailable_reason())
    cpu.set_kernels_isa(request.param)
    yield cpu.CpuBackend()
    cpu.set_kernels_isa(cpu_isas()[-1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,row_length", [(1, 1), (3, 7), (5, 2049), (40, 300)])
def test_native_magprune_equals_the_reference(cpu_backend, dtype, rows, row_length):
    generator = torch.Generator().manual_seed(rows * row_length)
    base = torch.randn(rows * row_length, generator=generator).to(dtype)
    model = (base.float() + 0.01 * torch.randn(base.shape, generator=generator)).to(dtype)
    model[::11] = base[::11]  # equal magnitudes (zero deltas): ties broken by position
    key = rng.philox_key(3, "layers.0.mlp.weight", 1)
    for out_dtype in (torch.float32, dtype):
        expected, actual = torch.empty(base.numel(), dtype=out_dtype), torch.full((base.numel(),), 7.0, dtype=out_dtype)
        sums = REFERENCE.della_deltas(expected, base, model, row_length, 0.4, 0.15, *key, 1.7, 1 << 33)
        native_sums = cpu_backend.della_deltas(actual, base, model, row_length, 0.4, 0.15, *key, 1.7, 1 << 33)
        assert torch.equal(actual.view(torch.uint8), expected.view(torch.uint8))
        assert native_sums == pytest.approx(sums, rel=1e-12)
    assert "della_deltas" in cpu_backend.accelerated




@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,row_length", [(1, 1), (3, 7), (67, 509), (40, 2049)])
def test_native_keep_bits_and_their_apply_equal_the_reference(cpu_backend, dtype, rows, row_length):
    """The keep decisions as bits (rows of odd lengths end inside a byte; the threads take eight rows
    at a time, so their bytes never overlap) and the combine that applies them: the reference's bits,
    the unused bits of the last byte clear, and della_deltas' values."""
    from dtm_fast.merge.magprune import packed_size, unpack_bits

    generator = torch.Generator().manual_seed(rows + row_length)
    base = torch.randn(rows * row_length, generator=generator).to(dtype)
    model = (base.float() + 0.01 * torch.randn(base.shape, generator=generator)).to(dtype)
    key = rng.philox_key(4, "layers.2.mlp.down_proj.weight", 0)
    start = 3 * rows * row_length  # a later chunk of the tensor
    expected = torch.empty(packed_size(base.numel()), dtype=torch.uint8)
    actual = torch.full_like(expected, 0xA5)
    sums = REFERENCE.della_keep_bits(expected, base, model, row_length, 0.4, 0.15, *key, start)
    native_sums = cpu_backend.della_keep_bits(actual, base, model, row_length, 0.4, 0.15, *key, start)
    assert torch.equal(actual, expected)
    assert native_sums == pytest.approx(sums, rel=1e-12)
    pruned = torch.empty(base.numel(), dtype=torch.float32)
    REFERENCE.della_deltas(pruned, base, model, row_length, 0.4, 0.15, *key, 1.3, start)
    nonzero = model.float() != base.float()  # a kept zero delta is zero too
    assert torch.equal(unpack_bits(expected, base.numel())[nonzero], (pruned != 0)[nonzero])
    assert int(expected[-1]) >> (base.numel() - 8 * (expected.numel() - 1)) == 0  # the unused bits
    for backend in (REFERENCE, cpu_backend):
        for out_dtype in (torch.float32, dtype):
            applied = torch.full((base.numel(),), 7.0, dtype=out_dtype)
            backend.della_apply(applied, base, model, expected, 1.3)
            assert torch.equal(applied.view(torch.uint8), pruned.to(out_dtype).view(torch.uint8))
    assert {"della_keep_bits", "della_apply"} <= cpu_backend.accelerated

def test_native_magprune_ranks_rows_of_few_and_of_many_distinct_magnitudes(cpu_backend):
    """The kernel ranks a row through its distinct magnitudes when it has at most a quarter as many
    as elements (100 for rows of 400) and sorts it whole otherwise, then sorts the next rows without
    trying: rows on both sides of that bound, in an order that crosses the skipped rows, must rank
    as the reference's stable argsort does."""
    row_length = 400
    generator = torch.Generator().manual_seed(5)
    distinct_per_row = [400, 100, 101, 1, 99, 100, 2, 400, 3] + [100, 101, 50, 400, 7] * 5
    rows = []
    for distinct in distinct_per_row:
        magnitudes = (torch.randperm(row_length, generator=generator) % distinct + 1).float() * 0.375
        signs = torch.where(torch.rand(row_length, generator=generator) < 0.5, -1.0, 1.0)
        rows.append(magnitudes * signs)
    model = torch.cat(rows)
    base = torch.zeros_like(model)
    key = rng.philox_key(9, "layers.1.self_attn.q_proj.weight", 2)
    expected, actual = torch.empty_like(model), torch.full_like(model, 7.0)
    sums = REFERENCE.della_deltas(expected, base, model, row_length, 0.5, 0.2, *key, 1.0, 12345)
    native_sums = cpu_backend.della_deltas(actual, base, model, row_length, 0.5, 0.2, *key, 1.0, 12345)
    assert torch.equal(actual.view(torch.uint8), expected.view(torch.uint8))
    assert native_sums == pytest.approx(sums, rel=1e-12)

def test_kept_fraction_rises_with_the_magnitude_rank():
    row_length = 20_000
    generator = torch.Generator().manual_seed(0)
    base = torch.zeros(row_length)
    model = torch.randn(row_length, generator=generator)
    out = torch.empty(row_length)
    total, kept = REFERENCE.della_deltas(out, base, model, row_length, 0.5, 0.3, 11, 12, 1.0, 0)
    order = torch.argsort(model.abs())
    kept_mask = out[order] != 0
    smallest, largest = kept_mask[: row_length // 10].float().mean(), kept_mask[-row_length // 10:].float().mean()
    assert abs(float(smallest) - 0.23) < 0.02 and abs(float(largest) - 0.77) < 0.02  # p = 0.2..0.26 and 0.74..0.8
    assert abs(float(kept_mask.float().mean()) - 0.5) < 0.01
    assert kept == pytest.approx(float(model.abs()[out != 0].double().sum()))
    assert total == pytest.approx(float(model.abs().double().sum()))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("della")
    generator = torch.Generator().manual_seed(21)
    shapes = {"model.layers.0.mlp.up_proj.weight": (96, 64), "model.layers.0.input_layernorm.weight": (64,)}
    base = {n: torch.randn(s, generator=generator) for n, s in shapes.items()}
    paths = [write_safetensors(root / "base" / "model.safetensors", base).parent]
    for index in range(3):
        model = {n: v + 0.05 * torch.randn(v.shape, generator=generator) for n, v in base.items()}
        paths.append(write_safetensors(root / f"m{index}" / "model.safetensors", model).parent)
    return paths


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_streamed_merge_equals_the_whole_tensor_definition(family, tmp_path, method, backend):
    per_model = [{"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {"weight": 0.5, "density": 0.3, "epsilon": 0.2},
                 {"weight": 0.8, "density": 1.0}]
    config = MergeConfig(method=method, models=tuple(ModelInput(p, d) for p, d in zip(family[1:], per_model)),
                         output=tmp_path / "out", base=family[0], backend=backend, max_memory=24 * 2**20)
    from dtm_fast.merge.engine import run_merge

    run_merge(config)
    merged = load_state(tmp_path / "out")
    tensors = [load_state(p) for p in family]
    for name, value in merged.items():
        params = config.tensor_params(name, 0, 1)
        expected = METHODS[method].reference(params, tensors[0][name], [t[name] for t in tensors[1:]],
                                             TensorContext(name, tuple(value.shape), 0))
        assert torch.equal(value, expected), name


LARGE_SHAPE = (2053, 1031)  # 2.1M elements: several chunks at 64 MiB, one at 1 GiB


@pytest.fixture(scope="module")
def large_family(tmp_path_factory):
    return tied_bf16_family(tmp_path_factory.mktemp("della-large"), LARGE_SHAPE, seed=5)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_every_way_of_carrying_the_pruning_between_passes_gives_the_same_bits(large_family, tmp_path, monkeypatch,
                                                                             method, cpu_backend):
    """With L1 rescale the sums pass prunes every model, then the combine needs the same pruned
    deltas: a tensor of one chunk keeps them in memory and only scales them, one of a few chunks keeps
    its keep bits and applies them, a larger one is pruned again. All three must give the same bits,
    each through the path its size calls for."""
    from dtm_fast.merge.backends.cpu import CpuBackend
    from dtm_fast.merge.engine import run_merge
    from dtm_fast.merge.methods import della

    calls: dict[str, list[int]] = {"della_deltas": [], "della_keep_bits": [], "della_apply": []}
    original_init = CpuBackend.__init__

    def counting_init(self):
        original_init(self)
        for name, counted_calls in calls.items():
            native = getattr(self, name)  # bound per instance

            def counted(*args, native=native, counted_calls=counted_calls):
                counted_calls.append(args[0].numel())
                return native(*args)

            setattr(self, name, counted)

    monkeypatch.setattr(CpuBackend, "__init__", counting_init)
    per_model = [{"density": 0.5, "epsilon": 0.1}, {"density": 0.3, "epsilon": 0.2}, {"density": 0.7, "epsilon": 0.15}]
    numel = LARGE_SHAPE[0] * LARGE_SHAPE[1]
    outputs = {}
    for case, max_memory, keep_bits_chunks in (("one chunk", 2**30, 16), ("keep bits", 64 * 2**20, 16),
                                                ("pruned again", 64 * 2**20, 1)):
        monkeypatch.setattr(della, "KEEP_BITS_CHUNKS", keep_bits_chunks)
        for counted_calls in calls.values():
            counted_calls.clear()
        run_merge(MergeConfig(method=method, models=tuple(ModelInput(p, d) for p, d in zip(large_family[1:], per_model)),
                              output=tmp_path / case, base=large_family[0], backend="cpu", max_memory=max_memory))
        outputs[case] = load_state(tmp_path / case)["w"]
        pruned, bits, applied = (calls[name] for name in ("della_deltas", "della_keep_bits", "della_apply"))
        if case == "one chunk":
            assert pruned == [numel] * 3 and not bits and not applied  # one pruning of each model
        elif case == "keep bits":
            chunks = len(applied) // 3
            assert chunks > 1 and not pruned and len(bits) == 3 * chunks and sum(applied) == 3 * numel
            assert sum(bits) == sum((size + 7) // 8 for size in applied)  # bytes of bits for every element
        else:
            assert len(pruned) > 2 * 3 and sum(pruned) == 2 * 3 * numel and not bits  # each chunk pruned twice
    for case in ("keep bits", "pruned again"):
        assert torch.equal(outputs[case].view(torch.int16), outputs["one chunk"].view(torch.int16)), case


def test_epsilon_that_leaves_the_unit_interval_is_refused(family, tmp_path, capsys):
    assert dtm(["merge", "--method", "della", "--base", str(family[0]), str(family[1]), "--density", "0.9",
                "--param", "epsilon=0.2", "-o", str(tmp_path / "out"), "--quiet"]) == 1
    assert "epsilon 0.2 must keep density +- epsilon inside (0, 1)" in capsys.readouterr().err


def merged_deltas(out: Path, base: Path) -> dict[str, torch.Tensor]:
    merged, original = load_state(out), load_state(base)
    return {name: merged[name] - original[name] for name in original}


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_a_mergekit_config_matches_mergekit_in_distribution(llama_family, tmp_path, method):
    """One model, so each element's fate shows: the kept share among the smallest and the largest
    thirds of each row's magnitudes (MagPrune's rank dependence), and the L1 rescale."""
    paths = llama_family["fp32"]
    config = tmp_path / "della.yml"
    config.write_text(f"merge_method: {method}\nbase_model: {paths['base']}\nmodels:\n  - model: {paths['m0']}\n"
                      "    parameters: {weight: 1.0, density: 0.4, epsilon: 0.15}\ndtype: float32\n")
    run_mergekit(config, tmp_path / "mk")
    assert dtm(["merge", str(config), str(tmp_path / "dtm"), "--quiet"]) == 0
    original = merged_deltas(paths["m0"], paths["base"])
    ours, theirs = merged_deltas(tmp_path / "dtm", paths["base"]), merged_deltas(tmp_path / "mk", paths["base"])
    for name, delta in original.items():
        if delta.dim() < 2 or delta.numel() < 4000:
            continue  # too few elements per group for tight statistics
        rank = delta.abs().argsort(dim=1).argsort(dim=1).float() / (delta.shape[1] - 1)  # 0 smallest .. 1 largest
        for group in (rank < 1 / 3, rank > 2 / 3):
            size = int(group.sum())
            share = [float((kept[group] != 0).float().mean()) for kept in (ours[name], theirs[name])]
            assert abs(share[0] - share[1]) < 5 * (2 * 0.25 / size) ** 0.5, (name, share)
        # with the L1 rescale both keep the task vector's L1 norm
        assert float(ours[name].abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-4)
        assert float(theirs[name].abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-4)
