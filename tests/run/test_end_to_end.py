"""`dtm run` end to end on a tiny model, K=2: disperse -> 2 sub-models + vanilla -> merge -> eval on
real MMLU questions; a second run does nothing; the dry run tells current stages from stale ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.run.conftest import dtm, write_config

pytestmark = pytest.mark.slow


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    assert tensors, f"no safetensors in {folder}"
    return tensors


def every_file(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_run_produces_every_stage(finished_run):
    run_dir = finished_run.parent / "run-uninterrupted"
    portions = [json.loads(line) for i in range(2) for line in (run_dir / "portions" / f"portion-{i}.jsonl").open()]
    assert len(portions) == 12  # every record in exactly one portion
    for name, steps in (("sub-0", 6), ("sub-1", 6), ("vanilla", 6)):
        manifest = json.loads((run_dir / name / "dtm_train.json").read_text())
        assert manifest["result"]["steps"] == steps
    # the vanilla baseline saw both portions; each sub-model its own
    vanilla_data = json.loads((run_dir / "vanilla" / "dtm_train.json").read_text())["config"]["data"]
    assert [Path(p).name for p in vanilla_data] == ["portion-0.jsonl", "portion-1.jsonl"]
    # the merge is the uniform average of the two sub-models (plain-torch oracle)
    sub0, sub1, merged = (weights(run_dir / n) for n in ("sub-0", "sub-1", "merged"))
    assert set(merged) == set(sub0)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, (sub0[name] + sub1[name]) / 2, rtol=1e-6, atol=1e-7)
    assert not torch.equal(sub0["model.layers.0.mlp.up_proj.weight"], sub1["model.layers.0.mlp.up_proj.weight"])
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert [(m["name"], m["role"]) for m in report["models"]] == [
        ("base", "base"), ("vanilla", "vanilla"), ("sub-0", "sub"), ("sub-1", "sub"), ("merged", "merged")]
    for model in report["models"]:
        assert model["scores"]["mmlu"]["samples"] == 3  # the three MMLU questions of the fixture
        # each model's per-sample log of lm_eval is kept in the run directory
        assert len((run_dir / "eval" / model["id"] / "samples" / "mmlu.jsonl").read_text().splitlines()) == 3
    merged = next(m for m in report["models"] if m["role"] == "merged")
    assert merged["comparisons"]["to_vanilla"]["model"] == "vanilla"
    for suffix in ("md", "png"):
        assert (run_dir / "report" / f"report.{suffix}").stat().st_size > 0


def test_second_run_does_nothing(finished_run, capsys):
    run_dir = finished_run.parent / "run-uninterrupted"
    before = every_file(run_dir)
    capsys.readouterr()
    assert dtm("run", str(finished_run), "--quiet") == 0
    captured = capsys.readouterr()
    assert "every stage was current; nothing to do" in captured.err
    assert "alignment tax" in captured.out  # the existing report is shown again
    assert every_file(run_dir) == before  # no file written, replaced or added


def dry_run_tables(capsys, config: Path) -> dict[str, dict]:
    """The dry run's tables (from its --json output), by title: rows keyed by their first cell."""
    capsys.readouterr()
    assert dtm("run", str(config), "--dry-run", "--json") == 0
    tables = {}
    for line in capsys.readouterr().out.splitlines():
        event = json.loads(line)
        if event["event"] == "table":
            tables[event["title"].split(" (")[0]] = {row[0]: row for row in event["rows"]}
    return tables


def test_dry_run_lists_stages_and_runs_nothing(assets, finished_run, capsys):
    fresh = write_config(assets, "fresh.yaml", run_dir="run-never-started")
    tables = dry_run_tables(capsys, fresh)
    plan = tables[f"dtm run {fresh}"]
    assert {name: row[1] for name, row in plan.items()} == {
        "base": "current", "disperse": "to run", "sub-0": "waits", "sub-1": "waits", "vanilla": "waits",
        "merged": "waits", "eval base": "to run", "eval vanilla": "waits", "eval sub-0": "waits",
        "eval sub-1": "waits", "eval merged": "waits", "report": "waits"}
    assert plan["sub-0"][3] == "after disperse (judged then)"
    cost = tables["estimated cost"]
    assert cost["sub-model (K=2)"][1] == "2 job(s)" and cost["vanilla"][2] == "6 steps"
    assert cost["evaluation"][1] == "5 model(s)" and "mmlu: 3 questions" in cost["evaluation"][2]
    assert not (assets / "run-never-started").exists()

    # the finished run with other merge weights: training is current, merge and its evaluation are not
    changed = write_config(assets, "reweighted.yaml", run_dir="run-uninterrupted",
                           merge={"method": "linear", "weights": [0.7, 0.3]})
    plan = dry_run_tables(capsys, changed)[f"dtm run {changed}"]
    for stage in ("base", "disperse", "sub-0", "sub-1", "vanilla", "eval base", "eval vanilla", "eval sub-0"):
        assert plan[stage][1] == "current", plan
    assert plan["merged"][3] == "reruns (its inputs or settings changed)"
    assert plan["eval merged"][3] == "after merged (judged then)"
