"""`dtm bench merge`'s parts: preset shapes, synthetic checkpoints (loaded by transformers), the
mergekit configuration (validated by mergekit), peak-RSS measurement, and one tiny end-to-end run."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dtm_fast.bench import merge as bench_merge  # noqa: E402
from dtm_fast.bench import merge_models, merge_runs  # noqa: E402

TINY = merge_models.Preset("tiny", 32, 48, 2, 64, 4, 2, 6000, "test-sized")


def test_default_preset_is_issue_3s_model():
    preset = merge_models.PRESETS["default"]
    # embeddings 2 x 32000 x 2048; per layer q,o 2048^2, k,v 256 x 2048, mlp 3 x 5632 x 2048, 2 norms
    per_layer = 2 * 2048 * 2048 + 2 * 256 * 2048 + 3 * 5632 * 2048 + 2 * 2048
    assert preset.parameter_count() * 2 == 2 * (2 * 32000 * 2048 + 12 * per_layer + 2048) == 1_319_211_008
    slice_70b = merge_models.PRESETS["70b-slice"]
    shapes = dict(slice_70b.tensor_shapes())
    assert shapes["model.embed_tokens.weight"] == (128256, 8192)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 8192)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (8192, 28672)


def test_synthetic_models_load_in_transformers(tmp_path):
    import transformers

    base, tuned = merge_models.build_models(tmp_path, TINY, models=2, noise=1e-3)
    assert len(list(base.glob("*.safetensors"))) > 1  # sharded at 6 kB
    base_model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    tuned_model = transformers.LlamaForCausalLM.from_pretrained(tuned[1], dtype=torch.bfloat16)
    base_up = base_model.model.layers[1].mlp.up_proj.weight.float()
    delta = tuned_model.model.layers[1].mlp.up_proj.weight.float() - base_up
    assert 0.015 < float(base_up.std()) < 0.025
    assert 0.0007 < float(delta.std()) < 0.0014  # bf16 rounding of base + N(0, 1e-3)
    assert merge_models.build_models(tmp_path, TINY, models=2, noise=1e-3) == (base, tuned)  # reused


@pytest.mark.parametrize("method", list(merge_runs.BENCH_METHODS))
def test_mergekit_accepts_the_configuration(tmp_path, method):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration

    models = [tmp_path / "a", tmp_path / "b"]
    config = MergeConfiguration.model_validate(merge_runs.mergekit_config(method, tmp_path / "base", models))
    assert config.merge_method == method
    spec = merge_runs.BENCH_METHODS[method]
    assert len(config.models) == (spec.max_models or 2)
    assert (config.base_model is None) == (not spec.base)


def test_every_benchmarked_config_merges_in_dtm(tmp_path):
    """The YAML both tools run: dtm merge takes it for every method dtm has."""
    from dtm_fast.cli import main as dtm

    base, tuned = merge_models.build_models(tmp_path / "models", TINY, models=2, noise=1e-3)
    for method in merge_runs.available_methods():
        config = merge_runs.write_config(method, base, tuned, tmp_path)
        command = merge_runs.dtm_command(config, tmp_path / f"out-{method}", None, "64MiB")
        assert command[3:6] == ["merge", str(config), str(tmp_path / f"out-{method}")] and "--backend" not in command
        assert dtm(command[3:]) == 0, method


def test_peak_rss_of_a_child_is_measured(tmp_path):
    allocate = "import numpy; a = numpy.ones(300 * 2**20, dtype=numpy.uint8); import time; time.sleep(0.2)"
    big = merge_runs.run_measured([sys.executable, "-c", allocate], tmp_path / "big.log")
    small = merge_runs.run_measured([sys.executable, "-c", "pass"], tmp_path / "small.log")
    assert big.peak_rss_bytes - small.peak_rss_bytes > 280 * 2**20
    assert big.wall_s >= 0.2


def test_failed_run_is_reported_with_its_log(tmp_path):
    from dtm_fast.errors import DtmError

    with pytest.raises(DtmError, match="exit code 3"):
        merge_runs.run_measured([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path / "f.log")
    assert "boom" in (tmp_path / "f.log").read_text()


def test_floor_reads_and_writes_every_byte(tmp_path):
    files = []
    for index, size in enumerate([0, 1, 5 * 2**20 + 3]):
        path = tmp_path / f"f{index}"
        path.write_bytes(os.urandom(size))
        files.append(path)
    buffer = bytearray(2**20)
    assert merge_runs.read_files_s(files, buffer) > 0
    assert merge_runs.write_bytes_s(tmp_path / "out.bin", 3 * 2**20 + 1, buffer) > 0
    assert not (tmp_path / "out.bin").exists()


def test_tiny_end_to_end_run(tmp_path, monkeypatch):
    monkeypatch.setitem(merge_models.PRESETS, "tiny", TINY)
    parser = argparse.ArgumentParser()
    bench_merge.configure(parser)
    args = parser.parse_args(["--preset", "tiny", "--models", "2", "--methods", "task_arithmetic", "--backends",
                              "cpu", "--repeats", "2", "--no-mergekit", "--workdir", str(tmp_path / "work"),
                              "--output", str(tmp_path / "out"), "--quiet"])
    assert bench_merge.run(args) == 0
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    tools = {row[1] for row in record["table"]["rows"]}
    assert tools == {"floor", "floor+fsync", "dtm (cpu)"}
    dtm = next(s for s in record["series"] if s["tool"] == "dtm")
    assert len(dtm["walls_s"]) == 2 and min(dtm["peak_rss_bytes"]) > record["baseline_rss_bytes"] // 2
    assert (tmp_path / "out" / "chart.png").stat().st_size > 1000
    # the run's outputs went to a directory of its own, removed at the end; the models stay for reuse
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [".tiny.lock", "tiny"]


def test_a_directory_the_benchmark_did_not_build_is_never_deleted(tmp_path):
    from dtm_fast.errors import DtmError

    mine = tmp_path / "tiny" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("the user's own file")
    with pytest.raises(DtmError, match="was not built by dtm bench"):
        merge_models.build_models(tmp_path, TINY, models=2, noise=1e-3)
    assert mine.read_text() == "the user's own file"


def test_models_built_with_other_settings_wait_for_the_runs_reading_them(tmp_path):
    """A run holds a shared lock on the models it reads until it exits; a rebuild needs them all gone."""
    import subprocess
    import time

    merge_models.build_models(tmp_path, TINY, models=2, noise=1e-3)  # this process now holds a shared lock
    script = ("import sys; from dtm_fast.bench import merge_models as m; "
              "from tests.bench.test_merge_bench import TINY; "
              "m.build_models(__import__('pathlib').Path(sys.argv[1]), TINY, models=3, noise=1e-3)")
    started = time.monotonic()
    rebuild = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=Path(__file__).parents[2])
    time.sleep(3)
    assert rebuild.poll() is None and (tmp_path / "tiny" / "ft-1").is_dir()  # waiting; the models intact
    for lock in merge_models._HELD_LOCKS:
        lock.close()  # as this process's exit would
    merge_models._HELD_LOCKS.clear()
    assert rebuild.wait(timeout=120) == 0 and time.monotonic() - started >= 3
    assert (tmp_path / "tiny" / "ft-2").is_dir()


def test_workdir_inside_the_repository_is_refused(tmp_path):
    from dtm_fast.errors import DtmError

    parser = argparse.ArgumentParser()
    bench_merge.configure(parser)
    repository = Path(bench_merge.__file__).resolve().parents[2]
    if not (repository / ".git").exists():
        pytest.skip("not running from a checkout")
    args = parser.parse_args(["--preset", "small", "--workdir", str(repository / "bench-models"),
                              "--output", str(tmp_path), "--quiet"])
    with pytest.raises(DtmError, match="inside the repository"):
        bench_merge.run(args)


def test_a_floor_is_its_fastest_repetition_and_a_merge_its_median():
    """Ratios to the floor take the floor's best run (noise only adds time) and the merge's median."""
    from dtm_fast.bench.merge_report import COLUMNS, Measurements, Series, rows

    series = [Series("floor", "ties", walls_s=[4.0, 1.0, 2.0], io_bytes=10**9),
              Series("floor+fsync", "ties", walls_s=[1.5, 3.0, 1.25], io_bytes=10**9),
              Series("dtm", "ties", "auto", walls_s=[3.0, 5.0, 2.5], peak_rss_bytes=[1], io_bytes=10**9),
              Series("mergekit", "ties", walls_s=[60.0], peak_rss_bytes=[1], io_bytes=10**9)]
    table = {row[1]: dict(zip(COLUMNS, row)) for row in rows(Measurements("default", "", 1, 1, 1, series, {}))}
    assert table["floor"]["wall s"] == "1.00" and table["dtm (auto)"]["wall s"] == "3.00"
    assert table["dtm (auto)"]["this / floor"] == "3.0x" and table["dtm (auto)"]["this / floor+fsync"] == "2.4x"
    assert table["dtm (auto)"]["mergekit / this"] == "20.0x"
