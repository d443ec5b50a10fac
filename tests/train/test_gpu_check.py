"""`make gpu-check`'s script in its CPU dry run: every step at tiny sizes (Triton through its
interpreter), the JSON and Markdown reports, and the exactness comparison it relies on."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def load_script():
    import importlib

    return importlib.import_module("dtm_fast.bench.gpu_check")


def test_ulp_difference_counts_units_in_the_last_place():
    ulp = load_script().ulp_difference
    a = torch.tensor([1.0, -2.0, 0.0, -0.0, 3.0], dtype=torch.bfloat16)
    assert ulp(a, a.clone()) == 0
    up = (a.view(torch.int16) + torch.tensor([1, 0, 0, 0, 0], dtype=torch.int16)).view(torch.bfloat16)
    assert ulp(a, up) == 1  # the next bf16 above 1.0
    assert ulp(torch.tensor([0.0], dtype=torch.bfloat16), torch.tensor([-0.0], dtype=torch.bfloat16)) == 0
    smallest = torch.tensor([1], dtype=torch.int16).view(torch.bfloat16)
    assert ulp(smallest, -smallest) == 2  # across zero: +1 ulp, -1 ulp
    assert ulp(torch.tensor([1.0]), torch.tensor([1.0 + 2**-23])) == 1  # float32


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step_and_writes_the_reports(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dtm_fast.bench.gpu_check", str(tmp_path), "--cpu-dry-run"],
                            capture_output=True, text=True, timeout=900, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())  # strict JSON
    assert report["dry_run"] is True
    assert list(report["steps"]) == ["gpu-tests", "triton-merge", "full-finetune", "lora"]
    assert all(step["status"] == "ok" for step in report["steps"].values()), report
    merge = report["steps"]["triton-merge"]
    assert set(merge["methods"]) == {"linear", "ties"}
    assert all(m["exact"] and m["worst_ulp"] <= 1 for m in merge["methods"].values())
    assert merge["copy_floor"]["what"].startswith("host memcpy (dry run")
    for name in ("full-finetune", "lora"):
        step = report["steps"][name]
        assert step["steps"] == 4 and step["tokens_per_s_per_device"] > 0
        assert step["mfu"] is None and "no known peak for cpu" in step["mfu_basis"]  # no invented peak
    assert report["steps"]["lora"]["trainable"] < report["steps"]["lora"]["parameters"]
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "CPU DRY RUN" in markdown and "| triton-merge | ok |" in markdown
