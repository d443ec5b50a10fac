"""A merge killed at seeded random points (inside a chunk write, between a shard's data and its done
marker, while the provenance or the index is written, during publishing) always resumes to the
uninterrupted result, byte for byte, and never publishes a partial output."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_safetensors
from dtm_fast.cli import main as dtm

# (module, function, calls in one merge of the family below): the child process dies at a seeded
# n-th call (os._exit: no cleanup, like SIGKILL)
KILL_POINTS = [
    ("dtm_fast.merge.stream", "write_exact", 6),
    ("dtm_fast.io.output", "create_shard", 3),
    ("dtm_fast.io.output", "finish_shard", 3),
    ("dtm_fast.io.output", "write_json", 5),
    ("dtm_fast.io.owned_dir", "publish", 1),
    ("dtm_fast.io.atomic", "fsync_directory", 6),
]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    generator = torch.Generator().manual_seed(9)
    shapes = {f"model.layers.{i}.mlp.weight": (40, 37) for i in range(5)} | {"model.norm.weight": (37,)}
    base = {n: torch.randn(s, generator=generator).bfloat16() for n, s in shapes.items()}
    paths = [write_safetensors(root / "base" / "model.safetensors", base).parent]
    for index in range(3):
        model = {n: (v.float() + 0.05 * torch.randn(v.shape, generator=generator)).bfloat16() for n, v in base.items()}
        paths.append(write_safetensors(root / f"m{index}" / "model.safetensors", model).parent)
    (paths[0] / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 5}')
    return paths


def args(paths, out: Path, method: str) -> list[str]:
    return ["merge", "--method", method, "--base", str(paths[0]), *map(str, paths[1:]), "--density", "0.6",
            "-o", str(out), "--max-shard-size", "6KB", "--quiet", "--seed", "4"]


def run_killed(argv: list[str], module: str, function: str, call: int) -> int:
    script = (
        "import importlib, os, sys\n"
        f"target = importlib.import_module({module!r})\n"
        f"original = getattr(target, {function!r})\n"
        "calls = [0]\n"
        "def dying(*a, **k):\n"
        "    calls[0] += 1\n"
        f"    if calls[0] == {call}:\n"
        "        os._exit(9)\n"
        "    return original(*a, **k)\n"
        f"setattr(target, {function!r}, dying)\n"
        # modules that imported the function by name get the dying one too
        "import dtm_fast.io.output, dtm_fast.merge.stream, dtm_fast.merge.engine, dtm_fast.io.owned_dir\n"
        "for m in (dtm_fast.io.output, dtm_fast.merge.stream, dtm_fast.merge.engine, dtm_fast.io.owned_dir):\n"
        f"    if getattr(m, {function!r}, None) is original:\n"
        f"        setattr(m, {function!r}, dying)\n"
        "from dtm_fast.cli import main\n"
        f"sys.exit(main({argv!r}))\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True).returncode


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs"])
def test_kills_at_random_points_always_resume_to_the_uninterrupted_result(family, tmp_path, method):
    fresh = tmp_path / "fresh"
    assert dtm(args(family, fresh, method)) == 0
    expected = {p.name: p.read_bytes() for p in fresh.iterdir() if p.suffix == ".safetensors" or p.name.endswith("index.json")}
    chooser = random.Random(f"faults-{method}")
    killed = 0
    for trial in range(6):
        out = tmp_path / f"out-{trial}"
        module, function, calls = chooser.choice(KILL_POINTS)
        call = chooser.randint(1, calls)
        code = run_killed(args(family, out, method), module, function, call)
        assert code in (0, 9), f"trial {trial} ({function} #{call}) exited {code}"
        if code == 9:
            killed += 1
            # whatever was killed, nothing incomplete is published under the output's name
            assert not out.exists() or (out / "dtm_merge.json").is_file()
        for attempt in range(3):  # the resumed run may itself be the one that publishes
            if out.exists() and (out / "dtm_merge.json").is_file():
                break
            assert dtm(args(family, out, method) + ["--resume"]) == 0, f"trial {trial}: resume failed"
        produced = {p.name: p.read_bytes() for p in out.iterdir() if p.name in expected}
        assert produced == expected, f"trial {trial}: killed in {function} call {call}, resumed output differs"
    assert killed >= 5  # the seeded points really interrupted (nearly) every run
