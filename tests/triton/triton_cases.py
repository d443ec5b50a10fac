"""Comparisons of a Triton backend against the reference backend (the specification), shared by the
interpreter tests (small sizes, CPU) and the GPU tests (larger sizes, CUDA)."""

from __future__ import annotations

import numpy as np
import torch

from dtm_fast.merge import rng
from dtm_fast.merge.backends.reference import NO_UPPER_KEY, GtaSpec, ReferenceBackend, Sparsify
from dtm_fast.merge.magnitude import magnitude_keys

REFERENCE = ReferenceBackend()
START = (1 << 32) + 12_345  # a chunk far into a tensor: the Philox counter's high word is non-zero


def ordered_bits(values: torch.Tensor) -> torch.Tensor:
    """int64 that orders like the float values, one step per representable value (-0 == +0)."""
    width = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[values.dtype]
    bits = values.view(width).to(torch.int64)
    magnitude = bits & ((1 << (8 * values.element_size() - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def assert_within_one_ulp(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 1) -> None:
    """Same NaN positions, every other element within `ulps` units in the last place of the dtype
    (ulps=0: identical values, -0 == +0)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), "NaN positions differ"
    distance = (ordered_bits(actual[~nan]) - ordered_bits(expected[~nan])).abs()
    worst = int(distance.max()) if distance.numel() else 0
    assert worst <= ulps, f"{int((distance > ulps).sum())} elements differ by more than {ulps} ulp (worst {worst})"


def make_inputs(count: int, models: int, dtype: torch.dtype, seed: int, special: bool = False):
    """(base, models): deltas of mixed sign and magnitude, some exactly zero; with `special`,
    NaN and +-Inf sprinkled into the base and the models (never where the test needs finite data)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(count, generator=generator)
    result = []
    for index in range(models):
        scale = torch.rand(count, generator=generator) * 10.0 ** torch.randint(-4, 0, (count,), generator=generator)
        delta = torch.randn(count, generator=generator) * scale
        delta[torch.rand(count, generator=generator) < 0.1] = 0.0
        result.append((base + delta).to(dtype))
    base = base.to(dtype)
    if special and count:
        specials = torch.tensor([float("nan"), float("inf"), float("-inf")]).to(dtype)
        for tensor in [base, *result]:
            where = torch.randint(0, count, (max(1, count // 50),), generator=generator)
            tensor[where] = specials[torch.randint(0, 3, where.shape, generator=generator)]
    return base, result


def band_rules(base: torch.Tensor, models: list[torch.Tensor]) -> list[Sparsify]:
    """A random rule, a TIES-like band (top half) and a breadcrumbs-like band, then 'none' rules."""
    rules = [Sparsify("random", philox_key=rng.philox_key(7, "layer.weight", 0), threshold=rng.keep_threshold(0.3),
                      scale=1 / 0.3)]
    for index, model in enumerate(models[1:3], start=1):
        keys = magnitude_keys(model.float() - base.float())
        low = int(keys.float().median()) if keys.numel() else 0
        high = NO_UPPER_KEY if index == 1 else int(keys.float().quantile(0.9)) if keys.numel() else 0
        # tie ranges as exactly-k thresholds set them (kept ties below / from a flat index)
        ranges = {"low_to": START + keys.numel() // 2} if index == 1 else {"low_from": START + keys.numel() // 3,
                                                                           "high_to": START + 2 * keys.numel() // 3}
        rules.append(Sparsify("band", low_key=low, high_key=high, scale=1.25, **ranges))
    while len(rules) < len(models):
        rules.append(Sparsify())
    return rules[:len(models)]


def check_linear(backend, count, in_dtype, out_dtype, models=3, special=False, ulps=1):
    _, inputs = make_inputs(count, models, in_dtype, seed=count + models, special=special)
    coefficients = [0.5, -0.25, 0.75, 0.1, 1.0][:models]
    expected, actual = torch.empty(count, dtype=out_dtype), torch.empty(count, dtype=out_dtype)
    REFERENCE.linear(expected, inputs, coefficients)
    backend.linear(actual, inputs, coefficients)
    assert_within_one_ulp(actual, expected, ulps)


def check_gta(backend, count, in_dtype, out_dtype, consensus, normalize, models=3, special=False, ulps=1):
    base, inputs = make_inputs(count, models, in_dtype, seed=3 * count + models, special=special)
    weights = (0.7, 1.0, -0.4, 0.3)[:models]
    spec = GtaSpec(weights=weights, sparsify=tuple(band_rules(base, inputs)), consensus=consensus,
                   normalize=normalize, lambda_=0.85)
    expected, actual = torch.empty(count, dtype=out_dtype), torch.empty(count, dtype=out_dtype)
    REFERENCE.gta(expected, base, inputs, spec, START)
    backend.gta(actual, base, inputs, spec, START)
    assert_within_one_ulp(actual, expected, ulps)


def check_histograms(backend, count, in_dtype, special=False):
    """Both radix-select passes: the high-16-bit histogram, then the low bits of its fullest bucket."""
    base, (model,) = make_inputs(count, 1, in_dtype, seed=5 * count, special=special)
    expected, actual = torch.zeros(1 << 16, dtype=torch.int64), torch.zeros(1 << 16, dtype=torch.int64)
    REFERENCE.abs_delta_histogram(base, model, expected, None)
    backend.abs_delta_histogram(base, model, actual, None)
    assert torch.equal(actual, expected)
    bucket = int(expected.argmax())
    expected.zero_()
    actual.fill_(3)  # the backend adds to what is there
    REFERENCE.abs_delta_histogram(base, model, expected, bucket)
    backend.abs_delta_histogram(base, model, actual, bucket)
    assert torch.equal(actual - 3, expected)


def check_masked_l1(backend, count, in_dtype):
    base, inputs = make_inputs(count, 3, in_dtype, seed=7 * count)
    for model, rule in zip(inputs, band_rules(base, inputs)):
        expected = REFERENCE.masked_l1(base, model, rule, START)
        actual = backend.masked_l1(base, model, rule, START)
        # float64 sums in a different order: equal to ~1e-15 relative
        assert torch.allclose(torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                              rtol=1e-12, atol=1e-300)


def check_select(backend, count, in_dtype, special=False):
    """The bracketed threshold pass against plain torch on the reference's keys: counts above and
    keys inside each bracket, two searches over the same model, and a buffer too small for its keys."""
    base, inputs = make_inputs(count, 2, in_dtype, seed=17 * count + 3, special=special)
    keys = [magnitude_keys(model.float() - base.float()) for model in inputs]
    finite = keys[0][keys[0] < 0x7F800000].double()
    low, high = (int(torch.quantile(finite, q)) if finite.numel() else 0 for q in (0.25, 0.75))
    searches = [(0, low, high), (0, 0, NO_UPPER_KEY), (1, high, high)]
    inside = [keys[m][(keys[m] >= lo) & (keys[m] <= hi)] for m, lo, hi in searches]
    buffers = [np.full(capacity, 0xFFFFFFFF, dtype=np.uint32)
               for capacity in (count + 1, inside[1].numel() // 2, count + 1)]
    counts = backend.abs_delta_select(base, [inputs[m] for m, _, _ in searches],
                                      [(lo, hi) for _, lo, hi in searches], buffers)
    assert counts == [(int((keys[m] > hi).sum()), selected.numel()) for (m, _, hi), selected in zip(searches, inside)]
    for buffer, selected in zip(buffers, inside):
        kept = min(len(buffer), selected.numel())
        assert np.all(buffer[kept:] == 0xFFFFFFFF)
        wanted = selected.numpy().astype(np.uint32)
        if kept == selected.numel():
            assert np.array_equal(np.sort(buffer[:kept]), np.sort(wanted))
        else:
            assert set(buffer[:kept].tolist()) <= set(wanted.tolist())


def check_delta_gram(backend, count, in_dtype, models=3):
    base, inputs = make_inputs(count, models, in_dtype, seed=11 * count + models)
    expected = torch.from_numpy(REFERENCE.delta_gram(base, inputs))
    actual = backend.delta_gram(base, inputs)
    assert isinstance(actual, np.ndarray) and actual.dtype == np.float64
    assert torch.allclose(torch.from_numpy(actual), expected, rtol=1e-12, atol=1e-300)


def check_model_stock(backend, rows, row_length, in_dtype, out_dtype, models=3, ulps=1):
    count = rows * row_length
    base, inputs = make_inputs(count, models, in_dtype, seed=13 * count + models)
    for ratio in (0.0, 0.37, 1.0):
        expected, actual = torch.empty(count, dtype=out_dtype), torch.empty(count, dtype=out_dtype)
        REFERENCE.model_stock_combine(expected, base, inputs, ratio)
        backend.model_stock_combine(actual, base, inputs, ratio)
        assert_within_one_ulp(actual, expected, ulps)
    if rows:
        inputs[1][:row_length] = base[:row_length]  # a row whose delta vanishes: ratio 0 for that row
    expected, actual = torch.empty(count, dtype=out_dtype), torch.empty(count, dtype=out_dtype)
    REFERENCE.model_stock_rows(expected, base, inputs, row_length)
    backend.model_stock_rows(actual, base, inputs, row_length)
    assert_within_one_ulp(actual, expected)


def check_slerp(backend, rows, row_length, in_dtype, out_dtype):
    count = rows * row_length
    first, (second,) = make_inputs(count, 1, in_dtype, seed=17 * count)
    second = second + torch.randn(count, generator=torch.Generator().manual_seed(1)).to(in_dtype)
    if rows >= 3:
        second[:row_length] = first[:row_length] * 2  # collinear: the linear branch
        first[row_length:2 * row_length] = 0  # zero norm
    for t in (0.0, 0.3, 1.0):
        expected, actual = torch.empty(count, dtype=out_dtype), torch.empty(count, dtype=out_dtype)
        REFERENCE.slerp_rows(expected, first, second, row_length, t)
        backend.slerp_rows(actual, first, second, row_length, t)
        assert_within_one_ulp(actual, expected)


def check_fisher(backend, count, in_dtype, out_dtype, models=3, special=False, ulps=1):
    _, inputs = make_inputs(count, models, in_dtype, seed=19 * count + models, special=special)
    generator = torch.Generator().manual_seed(count)
    fishers = [torch.rand(count, generator=generator) * (torch.rand(count, generator=generator) > 0.2)
               for _ in range(models)]
    weights = [1.0, 2.5, 0.5, 1.5][:models]
    expected, actual = torch.empty(count, dtype=out_dtype), torch.empty(count, dtype=out_dtype)
    REFERENCE.fisher(expected, inputs, fishers, weights, 1e-8)
    backend.fisher(actual, inputs, fishers, weights, 1e-8)
    assert_within_one_ulp(actual, expected, ulps)


def check_dare_masks(backend, count, start, density, seed=3):
    """The kept set of a DARE rule, read off gta with base 0, model 1, scale 1, equals rng.keep_mask."""
    key = rng.philox_key(seed, "model.layers.0.mlp.up_proj.weight", 2)
    rule = Sparsify("random", philox_key=key, threshold=rng.keep_threshold(density))
    spec = GtaSpec(weights=(1.0,), sparsify=(rule,), consensus=None, normalize=False, lambda_=1.0)
    kept = torch.empty(count, dtype=torch.float32)
    backend.gta(kept, torch.zeros(count, dtype=torch.bfloat16), [torch.ones(count, dtype=torch.bfloat16)], spec, start)
    expected = rng.keep_mask(key, start, count, rule.threshold)
    assert torch.equal(kept == 1, expected)
    assert torch.equal(kept[~expected], torch.zeros(int((~expected).sum())))


def build_family(root, shapes: dict[str, tuple[int, ...]], seed: int = 41):
    """A bf16 base and three fine-tunes (base + N(0, 0.01)) as safetensors directories."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    paths = []
    for index in range(4):
        tensors = {name: value if index == 0 else value + 0.01 * torch.randn(value.shape, generator=generator)
                   for name, value in base.items()}
        directory = root / ("base" if index == 0 else f"m{index - 1}")
        directory.mkdir(parents=True)
        save_file({name: value.bfloat16() for name, value in tensors.items()}, str(directory / "model.safetensors"))
        paths.append(directory)
    return paths


def check_merge(family, tmp_path, method, extra, ulps, budgets: dict[str, str]):
    """`dtm merge --backend triton` equals `--backend reference` on the same inputs; `budgets`
    (--max-memory per backend) can set different chunk sizes for the two."""
    from safetensors.torch import load_file

    from dtm_fast.cli import main as dtm

    base, *models = family
    if method == "slerp":
        models = models[:1]
    outputs = {}
    for backend in ("reference", "triton"):
        out = tmp_path / backend
        code = dtm(["merge", "--method", method, "--base", str(base), *map(str, models), "-o", str(out),
                    "--backend", backend, "--max-memory", budgets[backend], "--quiet", *extra])
        assert code == 0
        outputs[backend] = load_file(str(out / "model.safetensors"))
    assert outputs["triton"].keys() == outputs["reference"].keys()
    for name, expected in outputs["reference"].items():
        assert_within_one_ulp(outputs["triton"][name], expected, ulps)
