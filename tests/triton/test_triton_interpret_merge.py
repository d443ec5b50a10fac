"""Whole `dtm merge` runs with --backend triton (interpreted on CPU) against --backend reference on the
same inputs: a small budget splits every tensor into several chunks, at other boundaries than the
reference's (whose workspace per element is larger), so DARE masks and TIES thresholds must not depend
on chunking either."""

import pytest
import torch

pytest.importorskip("triton")

import triton_cases as cases  # noqa: E402

from dtm_fast.cli import main as dtm  # noqa: E402

pytestmark = [pytest.mark.triton_interpret,
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


def write_model(directory, tensors):
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    save_file({name: value.contiguous() for name, value in tensors.items()}, str(directory / "model.safetensors"))
    return directory


def read_model(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    generator = torch.Generator().manual_seed(41)
    base = {"layers.0.mlp.weight": torch.randn(300, 77, generator=generator),
            "layers.0.norm.weight": torch.randn(77, generator=generator)}
    paths = [write_model(root / "base", {k: v.bfloat16() for k, v in base.items()})]
    for index in range(3):
        model = {k: (v + 0.01 * torch.randn(v.shape, generator=generator)).bfloat16() for k, v in base.items()}
        paths.append(write_model(root / f"m{index}", model))
    return paths


@pytest.mark.parametrize("method,extra,ulps", [
    ("linear", ["--weights", "1", "2", "3"], 0),
    ("task_arithmetic", ["--lambda", "0.8"], 0),
    ("ties", ["--density", "0.3", "--weights", "1", "0.5", "0.8"], 0),
    ("dare_ties", ["--density", "0.4", "--seed", "5"], 0),
    ("dare_linear", ["--density", "0.6", "0.5", "0.7"], 0),
    ("breadcrumbs_ties", ["--density", "0.5", "--gamma", "0.05", "--rescale", "l1"], 0),
    ("model_stock", [], 1),
    ("model_stock", ["--param", "filter_wise=true"], 1),
    ("slerp", ["--t", "0.3"], 1),
])
def test_merge_equals_reference_backend(bf16_family, tmp_path, method, extra, ulps):
    base, *models = bf16_family
    if method == "slerp":
        models = models[:1]
    outputs = {}
    for backend in ("reference", "triton"):
        out = tmp_path / backend
        code = dtm(["merge", "--method", method, "--base", str(base), *map(str, models), "-o", str(out),
                    "--backend", backend, "--max-memory", "17MiB", "--quiet", *extra])
        assert code == 0
        outputs[backend] = read_model(out)
    assert outputs["triton"].keys() == outputs["reference"].keys()
    for name, expected in outputs["reference"].items():
        cases.assert_within_one_ulp(outputs["triton"][name], expected, ulps)
