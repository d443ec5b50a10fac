"""The native backend's mapped reads: chunks are views of the memory-mapped input files when the
budget allows. They must give the bytes of copied reads, and dtypes the kernels do not take must
reach the reference backend through them quietly."""

from __future__ import annotations

import pytest
import torch

from conftest import BIG_SHAPE, write_safetensors
from dtm_fast.merge.config import MergeConfig, ModelInput
from dtm_fast.merge.engine import run_merge

def test_mapped_reads_give_the_bytes_of_copied_reads(bf16_big_family, tmp_path, monkeypatch):
    """The native backend reads memory-mapped inputs when the budget allows; copies into buffers
    (the path of small budgets and the torch backends) must give the same output bytes."""
    from dtm_fast.merge import stream
    from dtm_fast.merge.backends import cpu

    if cpu.unavailable_reason():
        pytest.skip(cpu.unavailable_reason())
    mapped_ranges = []
    original = stream.FileCache.map_range

    def counting(self, path, offset, length):
        mapped_ranges.append(length)
        return original(self, path, offset, length)

    monkeypatch.setattr(stream.FileCache, "map_range", counting)
    outputs = {}
    for reads_mapped in (True, False):
        monkeypatch.setattr(cpu.CpuBackend, "reads_mapped", reads_mapped)
        for method, per_model in (("ties", [{"density": 0.5}] * 3), ("dare_ties", [{"density": 0.3}] * 3)):
            out = tmp_path / f"{method}-{reads_mapped}"
            config = MergeConfig(method=method, models=tuple(ModelInput(p, d) for p, d in zip(bf16_big_family[1:], per_model)),
                                 output=out, base=bf16_big_family[0], backend="cpu")
            run_merge(config)
            outputs[(method, reads_mapped)] = (out / "model.safetensors").read_bytes()
        if reads_mapped:
            assert sum(mapped_ranges) >= 4 * BIG_SHAPE[0] * BIG_SHAPE[1] * 2  # every input was read through its map
    assert outputs[("ties", True)] == outputs[("ties", False)]
    assert outputs[("dare_ties", True)] == outputs[("dare_ties", False)]


def test_dtypes_the_kernels_do_not_take_go_through_the_reference_quietly(tmp_path, recwarn):
    """float64 tensors reach the native backend as read-only mapped chunks, which it hands to the
    reference backend: same bytes as the reference backend's merge, and no warning on the way."""
    from dtm_fast.merge.backends import cpu

    if cpu.unavailable_reason():
        pytest.skip(cpu.unavailable_reason())
    generator = torch.Generator().manual_seed(8)
    paths = []
    for index in range(3):
        tensors = {"a": torch.randn(301, 300, generator=generator, dtype=torch.float64),
                   "b": torch.randn(1000, generator=generator).bfloat16(), "c": torch.arange(10)}
        paths.append(write_safetensors(tmp_path / f"m{index}" / "model.safetensors", tensors).parent)
    outputs = {}
    for backend in ("cpu", "reference"):
        config = MergeConfig(method="ties", models=tuple(ModelInput(p, {"density": 0.5}) for p in paths[1:]),
                             output=tmp_path / backend, base=paths[0], backend=backend)
        run_merge(config)
        outputs[backend] = (tmp_path / backend / "model.safetensors").read_bytes()
    assert outputs["cpu"] == outputs["reference"]
    assert not [w for w in recwarn if "not writable" in str(w.message)]
