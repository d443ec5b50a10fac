"""Whole `dtm merge` runs with each accelerated backend against `--backend reference` on the same
inputs. Budgets that differ between the two give different chunkings, so DARE masks, TIES
thresholds and row statistics must not depend on where a chunk ends either."""

from __future__ import annotations

import pytest
import torch

from . import cases

SMALL = {"layers.0.mlp.weight": (300, 77), "layers.0.norm.weight": (77,)}
LARGE = {"layers.0.mlp.down_proj.weight": (5632, 2048), "layers.0.norm.weight": (2048,)}  # TinyLlama's MLP


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


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return {}, tmp_path_factory


def family_for(families, subject):
    cache, factory = families
    shapes = LARGE if subject.name == "triton-cuda" else SMALL
    key = "large" if shapes is LARGE else "small"
    if key not in cache:
        cache[key] = build_family(factory.mktemp(key), shapes)
    return cache[key]


METHODS = [
    ("linear", ["--weights", "1", "2", "3"], 0),
    ("task_arithmetic", ["--lambda", "0.8"], 0),
    ("ties", ["--density", "0.3", "--weights", "1", "0.5", "0.8"], 0),
    ("dare_ties", ["--density", "0.4", "--seed", "5"], 0),
    ("dare_linear", ["--density", "0.6", "0.5", "0.7"], 0),
    ("breadcrumbs_ties", ["--density", "0.5", "--gamma", "0.05", "--rescale", "l1"], 0),
    ("model_stock", [], 1),
    ("model_stock", ["--param", "filter_wise=true"], 1),
    ("slerp", ["--t", "0.3"], 1),
]


@pytest.mark.parametrize("method,extra,ulps", METHODS, ids=[f"{m}{'-' + e[1] if e else ''}" for m, e, _ in METHODS])
def test_merge_equals_the_reference_backend(accelerated, families, tmp_path, method, extra, ulps):
    from safetensors.torch import load_file

    from dtm_fast.cli import main as dtm

    base, *models = family_for(families, accelerated)
    if method == "slerp":
        models = models[:1]
    # the small family at these budgets: chunks of ~12k elements for one backend, ~4k for the other
    budgets = ({"accelerated": "64MiB", "reference": "64MiB"} if accelerated.name == "triton-cuda"
               else {"accelerated": "18MiB", "reference": "17MiB"})
    name = accelerated.name.split("-")[0]
    outputs = {}
    for role, backend in (("accelerated", name), ("reference", "reference")):
        out = tmp_path / role
        code = dtm(["merge", "--method", method, "--base", str(base), *map(str, models), "-o", str(out),
                    "--backend", backend, "--max-memory", budgets[role], "--quiet", *extra])
        assert code == 0
        outputs[role] = load_file(str(out / "model.safetensors"))
    assert outputs["accelerated"].keys() == outputs["reference"].keys()
    for tensor, expected in outputs["reference"].items():
        cases.assert_within_ulps(outputs["accelerated"][tensor], expected, max(ulps, accelerated.ulps))
