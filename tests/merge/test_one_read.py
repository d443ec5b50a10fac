"""TIES and breadcrumbs on a tensor larger than the memory budget's chunk (merge/one_read.py): every
input element is read once, the kept-aside elements are patched in (from memory or spilled to the
scratch file), and the output equals the in-memory reference bit for bit, ties at the threshold
included; a merge killed mid-tensor resumes to the same bytes and leaves no scratch file behind."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import load_state, tied_bf16_family
from dtm_fast.merge import kept_aside, magnitude, one_read, stream
from dtm_fast.merge.config import MergeConfig, ModelInput
from dtm_fast.merge.engine import run_merge
from dtm_fast.merge.methods import METHODS
from dtm_fast.merge.methods.base import TensorContext

SHAPE = (2053, 1031)  # 2.1M elements: three chunks of ~720k at --max-memory 64MiB (cpu, mapped reads)
MAX_MEMORY = 64 * 2**20
DENSITIES = [{"density": 0.5}, {"density": 0.3}, {"density": 0.7}]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """bf16 fine-tunes whose deltas take few distinct values: many magnitudes tie at each threshold."""
    return tied_bf16_family(tmp_path_factory.mktemp("one-read"), SHAPE, seed=13)


@pytest.fixture
def reads(monkeypatch):
    """Elements of "w" read from the inputs, and how the one-read merges ended."""
    seen = {"elements": 0, "chunks": 0, "one_read": 0, "fallback": 0}
    read, merge_bands = stream.TensorStream.read, one_read.merge_bands

    def counting_read(self, slot, start, stop):
        if self.context.name == "w":
            seen["elements"] += stop - start
            seen["chunks"] += 1
        return read(self, slot, start, stop)

    def counted(*args):
        done = merge_bands(*args)
        seen["one_read" if done else "fallback"] += 1
        return done

    monkeypatch.setattr(stream.TensorStream, "read", counting_read)
    monkeypatch.setattr(one_read, "merge_bands", counted)
    return seen


def reference(paths, method: str, per_model: list[dict]) -> torch.Tensor:
    config = MergeConfig(method=method, models=tuple(ModelInput(p, d) for p, d in zip(paths[1:], per_model)),
                         output=paths[0].parent / "unused", base=paths[0])
    tensors = [load_state(p)["w"] for p in paths]
    return METHODS[method].reference(config.tensor_params("w", None, None), tensors[0], tensors[1:],
                                     TensorContext("w", SHAPE, 0)).bfloat16()


def merge(paths, out, method: str, per_model: list[dict], backend: str = "cpu",
          max_memory: int = MAX_MEMORY) -> torch.Tensor:
    config = MergeConfig(method=method, models=tuple(ModelInput(p, d) for p, d in zip(paths[1:], per_model)),
                         output=out, base=paths[0], backend=backend, max_memory=max_memory)
    run_merge(config)
    return load_state(out)["w"]


def need_cpu():
    from dtm_fast.merge.backends import cpu

    if cpu.unavailable_reason():
        pytest.skip(cpu.unavailable_reason())


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_the_thresholds_split_ties(family):
    """The data really has ties at the threshold that the exact-k rule splits by index."""
    base, model = (load_state(p)["w"].float() for p in family[:2])
    keys = magnitude.magnitude_keys(model - base).reshape(-1)
    k = magnitude.top_k_count(0.5, keys.numel())
    key = magnitude.kth_largest_key_in_memory(keys, k)
    above, ties = int((keys > key).sum()), int((keys == key).sum())
    assert ties > 1 and above < k < above + ties


@pytest.mark.parametrize("method,per_model", [("ties", DENSITIES),
                                              ("breadcrumbs", [{"density": 0.4, "gamma": 0.05}] * 3),
                                              ("breadcrumbs_ties", [{"density": 0.6, "gamma": 0.02}] * 3)])
def test_over_budget_tensor_is_read_once_and_equals_the_reference(family, tmp_path, reads, method, per_model):
    need_cpu()
    merged = merge(family, tmp_path / "out", method, per_model)
    assert reads["chunks"] >= 3 and reads["elements"] == SHAPE[0] * SHAPE[1]  # one read of every element
    assert reads == {**reads, "one_read": 1, "fallback": 0}
    assert same_bits(merged, reference(family, method, per_model))


def test_a_bracket_that_misses_falls_back_to_the_exact_passes(family, tmp_path, reads, monkeypatch):
    need_cpu()
    monkeypatch.setattr(magnitude, "bracket", lambda sample, rank, numel: (0, 0))  # every rank lies above it
    merged = merge(family, tmp_path / "out", "ties", DENSITIES)
    assert reads["one_read"] == 0 and reads["fallback"] == 1
    assert same_bits(merged, reference(family, "ties", DENSITIES))


def test_a_tensor_held_in_one_chunk_takes_its_thresholds_in_memory(family, tmp_path, reads):
    """At a budget whose chunk holds the whole tensor, it is read once without the one-read merge's
    kept-aside elements: the passes over the chunk in its slot read nothing more."""
    need_cpu()
    merged = merge(family, tmp_path / "out", "ties", DENSITIES, max_memory=512 * 2**20)
    assert reads["one_read"] == 0 and reads["fallback"] == 0
    assert reads["chunks"] == 1 and reads["elements"] == SHAPE[0] * SHAPE[1]
    assert same_bits(merged, reference(family, "ties", DENSITIES))


def test_threshold_ties_all_in_one_read(family, tmp_path, reads):
    need_cpu()
    merged = merge_with(family, tmp_path / "out", "ties", DENSITIES, {"threshold_ties": "all"})
    assert reads["one_read"] == 1 and reads["elements"] == SHAPE[0] * SHAPE[1]
    tensors = [load_state(p)["w"] for p in family]
    params = MergeConfig(method="ties", models=tuple(ModelInput(p, d) for p, d in zip(family[1:], DENSITIES)),
                         output=tmp_path / "unused", base=family[0], parameters={"threshold_ties": "all"})
    expected = METHODS["ties"].reference(params.tensor_params("w", None, None), tensors[0], tensors[1:],
                                         TensorContext("w", SHAPE, 0)).bfloat16()
    assert same_bits(merged, expected)


def merge_with(paths, out, method: str, per_model: list[dict], parameters: dict) -> torch.Tensor:
    config = MergeConfig(method=method, models=tuple(ModelInput(p, d) for p, d in zip(paths[1:], per_model)),
                         output=out, base=paths[0], backend="cpu", max_memory=MAX_MEMORY, parameters=parameters)
    run_merge(config)
    return load_state(out)["w"]


def test_kept_aside_elements_spilled_to_the_scratch_file(family, tmp_path, reads, monkeypatch):
    need_cpu()
    spilled = []

    class Spilling(kept_aside.KeptAside):
        def __init__(self, dtypes, memory_limit, directory):
            super().__init__(dtypes, 0, directory)  # nothing held in memory: every part goes to the file
            spilled.append(self)

    monkeypatch.setattr(one_read, "KeptAside", Spilling)
    merged = merge(family, tmp_path / "out", "ties", DENSITIES)
    assert reads["one_read"] == 1 and spilled and all(k._fd is None for k in spilled)  # closed: space freed
    assert same_bits(merged, reference(family, "ties", DENSITIES))
    # the scratch file had no name: nothing but the output's own files is left
    assert not [p for p in tmp_path.rglob("*") if "kept-aside" in p.name or p.name.endswith(".dtm-partial")]


def test_the_reference_backend_takes_the_same_path(family, tmp_path, reads):
    merged = merge(family, tmp_path / "out", "ties", DENSITIES, backend="reference",
                   max_memory=128 * 2**20)  # its torch temporaries take ~160 bytes per chunk element
    assert reads["one_read"] == 1 and reads["elements"] == SHAPE[0] * SHAPE[1]
    assert same_bits(merged, reference(family, "ties", DENSITIES))


KILL_SCRIPT = """
import importlib, os, sys
from dtm_fast.merge import one_read, kept_aside, stream
target = importlib.import_module({module!r})
original = getattr(target, {function!r})
calls = [0]
def dying(*a, **k):
    calls[0] += 1
    if calls[0] == {call}:
        os._exit(9)
    return original(*a, **k)
for m in (target, one_read, kept_aside, stream):
    if getattr(m, {function!r}, None) is original:
        setattr(m, {function!r}, dying)
from dtm_fast.cli import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("module,function,call", [
    ("dtm_fast.merge.stream", "write_exact", 2),  # mid-tensor, between provisional chunk writes
    ("dtm_fast.merge.kept_aside", "write_exact", 2),  # while spilling kept-aside elements
    ("dtm_fast.merge.kept_aside", "patch", 1),  # after the provisional output, before its patch
])
def test_killed_mid_tensor_resumes_to_the_reference(family, tmp_path, module, function, call):
    need_cpu()
    out = tmp_path / "out"
    argv = ["merge", "--method", "ties", "--base", str(family[0]), *map(str, family[1:]), "--density", "0.5",
            "-o", str(out), "--max-memory", "64MiB", "--backend", "cpu", "--quiet"]
    env_script = KILL_SCRIPT.format(module=module, function=function, call=call, argv=argv)
    if function == "write_exact" and module.endswith("kept_aside"):
        # force spilling in the child: no kept-aside part is held in memory
        env_script = env_script.replace("from dtm_fast.cli import main",
                                        "_init = kept_aside.KeptAside.__init__\n"
                                        "kept_aside.KeptAside.__init__ = lambda s, d, m, r: _init(s, d, 0, r)\n"
                                        "from dtm_fast.cli import main")
    killed = subprocess.run([sys.executable, "-c", env_script], capture_output=True)
    assert killed.returncode == 9, killed.stderr.decode()[-2000:]
    assert not out.exists()
    partial = out.with_name(out.name + ".dtm-partial")
    assert partial.is_dir() and not [p for p in partial.iterdir() if "kept-aside" in p.name]
    resumed = subprocess.run([sys.executable, "-m", "dtm_fast.cli", *argv, "--resume"], capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert same_bits(load_state(out)["w"], reference(family, "ties", [{"density": 0.5}] * 3))


@pytest.mark.parametrize("narrow", [1, one_read.NARROW_BRACKET], ids=["radix-halves", "key-by-key"])
def test_exact_keys_counted_key_by_key_or_by_radix_halves(family, tmp_path, reads, monkeypatch, narrow):
    """The brackets of these densities on this family: one of a single key, two of a few keys (0.26M
    and 0.79M key values wide). With NARROW_BRACKET 1 those take the two-pass radix select over the
    kept-aside keys instead of the one-pass count."""
    need_cpu()
    monkeypatch.setattr(one_read, "NARROW_BRACKET", narrow)
    merged = merge(family, tmp_path / "out", "ties", DENSITIES)
    assert reads["one_read"] == 1
    assert same_bits(merged, reference(family, "ties", DENSITIES))
