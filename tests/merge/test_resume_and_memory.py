"""A killed merge resumes to byte-identical output; peak memory stays within the budget even when
one tensor is several times larger than it; several processes can share the output shards."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import peak_above_baseline, write_safetensors
from dtm_fast.cli import main as dtm


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    generator = torch.Generator().manual_seed(5)
    names = {f"layers.{i}.weight": (64, 257) for i in range(8)}
    base = {n: torch.randn(s, generator=generator).to(torch.bfloat16) for n, s in names.items()}
    paths = [write_safetensors(root / "base" / "model.safetensors", base).parent]
    for index in range(2):
        model = {n: (v.float() + 0.05 * torch.randn(v.shape, generator=generator)).to(torch.bfloat16) for n, v in base.items()}
        paths.append(write_safetensors(root / f"m{index}" / "model.safetensors", model).parent)
    return paths


def merge_args(paths, out: Path) -> list[str]:
    base, m0, m1 = paths
    return ["merge", "--method", "ties", "--base", str(base), str(m0), str(m1), "--density", "0.3", "-o", str(out),
            "--max-shard-size", "40KB", "--backend", "reference", "--quiet"]


def test_resume_after_kill_is_byte_identical(many_shards, tmp_path):
    complete = tmp_path / "complete"
    assert dtm(merge_args(many_shards, complete)) == 0
    interrupted = tmp_path / "interrupted"
    # die like a SIGKILL (no cleanup) after the 3rd shard's data is written but before it is marked done
    script = textwrap.dedent(f"""
        import os, sys
        import dtm_fast.io.output as output
        finished = []
        original = output.finish_shard
        def finish_then_die(*args):
            if len(finished) == 2:
                os._exit(9)
            original(*args)
            finished.append(args[1])
        output.finish_shard = finish_then_die
        from dtm_fast.cli import main
        sys.exit(main({merge_args(many_shards, interrupted)!r}))
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert killed.returncode == 9
    assert not interrupted.exists()
    partial = tmp_path / "interrupted.dtm-partial"
    assert len(list(partial.glob(".done-*"))) == 2
    # without --resume the interrupted work is neither reused silently nor thrown away
    assert dtm(merge_args(many_shards, interrupted)) == 1
    assert partial.exists()
    assert dtm(merge_args(many_shards, interrupted) + ["--resume"]) == 0
    files = sorted(p.name for p in complete.iterdir())
    assert files == sorted(p.name for p in interrupted.iterdir())
    for name in files:
        if name != "dtm_merge.json":
            assert (complete / name).read_bytes() == (interrupted / name).read_bytes(), name
    assert not partial.exists()


def test_shard_index_processes_equal_single_process(many_shards, tmp_path):
    single = tmp_path / "single"
    assert dtm(merge_args(many_shards, single)) == 0
    shared = tmp_path / "shared"
    for index in range(3):
        assert dtm(merge_args(many_shards, shared) + ["--shard-index", str(index), "--num-shards", "3"]) == 0
        assert shared.exists() == (index == 2)  # the process that completes the last shard publishes
    for path in single.iterdir():
        if path.name != "dtm_merge.json":
            assert path.read_bytes() == (shared / path.name).read_bytes(), path.name


PEAK_SCRIPT = """
import sys
from pathlib import Path
import torch
from dtm_fast.merge.config import MergeConfig, ModelInput
from dtm_fast.merge.engine import run_merge
import dtm_fast.merge.backends.reference, dtm_fast.merge.stream  # imports before the baseline

paths = [Path(p) for p in sys.argv[1:4]]
method, budget, backend, out = sys.argv[4], int(sys.argv[5]), sys.argv[6], Path(sys.argv[7])
baseline = start_peak()
models = (ModelInput(paths[1]),) if method == "arcee_fusion" else (ModelInput(paths[1]), ModelInput(paths[2]))
parameters = {"ties": {"density": 0.5}, "sce": {"select_topk": 0.5}}.get(method, {})
config = MergeConfig(method=method, models=models, output=out, base=paths[0], parameters=parameters,
                     max_memory=budget, backend=backend)
run_merge(config)
report_peak(baseline)
"""


@pytest.fixture(scope="module")
def big_tensor_models(tmp_path_factory):
    """One 96 MiB fp32 tensor per model: three times the 32 MiB budget."""
    root = tmp_path_factory.mktemp("big")
    generator = torch.Generator().manual_seed(9)
    base = torch.randn(6144, 4096, generator=generator)
    paths = [write_safetensors(root / "base" / "model.safetensors", {"embed.weight": base, "norm": torch.ones(4096)}).parent]
    for index in range(2):
        model = base + 0.01 * torch.randn(base.shape, generator=generator)
        paths.append(write_safetensors(root / f"m{index}" / "model.safetensors",
                                       {"embed.weight": model, "norm": torch.ones(4096)}).parent)
    return paths


@pytest.mark.parametrize("method,backend", [("linear", "reference"), ("ties", "reference"), ("ties", "auto"),
                                            ("arcee_fusion", "auto"), ("sce", "auto")])
def test_peak_memory_stays_within_budget(big_tensor_models, tmp_path, method, backend):
    budget = 32 * 2**20
    above_baseline = peak_above_baseline(PEAK_SCRIPT, *big_tensor_models, method, budget, backend, tmp_path / "out")
    assert above_baseline <= budget, f"peak {above_baseline / 2**20:.1f} MiB above baseline > 32 MiB budget"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as merged:
        assert merged.get_slice("embed.weight").get_shape() == [6144, 4096]
