"""A merge on the cpu backend whose chunk operations are all native imports no torch: `import torch`
alone costs ~2 s and ~200 MiB of resident libraries here, which the peak of a merge would count
against its --max-memory. Each method below is run in a fresh interpreter on a tiny model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import write_safetensors

TORCH_FREE = ["linear", "task_arithmetic", "ties", "dare_ties", "della", "model_stock", "slerp", "nuslerp",
              "multislerp", "karcher", "nearswap", "ram", "passthrough"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("imports")
    generator = torch.Generator().manual_seed(4)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(48, 32, generator=generator).bfloat16(),
            "model.norm.weight": torch.randn(32, generator=generator).bfloat16()}
    paths = [write_safetensors(root / "base" / "model.safetensors", base).parent]
    for index in range(2):
        model = {n: (v.float() + 0.01 * torch.randn(v.shape, generator=generator)).bfloat16() for n, v in base.items()}
        paths.append(write_safetensors(root / f"m{index}" / "model.safetensors", model).parent)
    return paths


def need_native():
    from dtm_fast.merge.backends import cpu

    if cpu.unavailable_reason():
        pytest.skip(cpu.unavailable_reason())


# per-model parameters; slerp and nearswap take a global t and two models, the first of them the base
PER_MODEL = {"linear": "{weight: 1.0}", "task_arithmetic": "{weight: 1.0}", "multislerp": "{weight: 1.0}",
             "nuslerp": "{weight: 0.5}", "ties": "{density: 0.5, weight: 1.0}",
             "dare_ties": "{density: 0.5, weight: 1.0}", "della": "{density: 0.5, epsilon: 0.1, weight: 1.0}"}
GLOBAL_T = {"slerp": 0.3, "nearswap": 0.001}
NO_BASE = {"passthrough", "karcher", "multislerp"}


def config_text(method: str, base, models) -> str:
    if method in GLOBAL_T:
        return (f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {models[0]}\n"
                f"parameters: {{t: {GLOBAL_T[method]}}}\ndtype: bfloat16\n")
    chosen = models[:1] if method == "passthrough" else models
    lines = [f"merge_method: {method}"] + ([] if method in NO_BASE else [f"base_model: {base}"]) + ["models:"]
    for path in chosen:
        lines.append(f"  - model: {path}")
        if method in PER_MODEL:
            lines.append(f"    parameters: {PER_MODEL[method]}")
    return "\n".join(lines + ["dtype: bfloat16"]) + "\n"


@pytest.mark.parametrize("method", TORCH_FREE)
def test_a_native_merge_imports_no_torch(family, tmp_path, method):
    need_native()
    config = tmp_path / "merge.yml"
    config.write_text(config_text(method, family[0], family[1:]))
    code = ("import sys; from dtm_fast.cli import main; "
            f"code = main(['merge', {str(config)!r}, {str(tmp_path / 'out')!r}, '--backend', 'cpu', '--quiet']); "
            "print(code, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "0 False", result.stdout + result.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file() or any((tmp_path / "out").glob("*.safetensors"))
