"""Seeds, K values and merge settings in one `dtm run` config: each combination is its own stages,
base and vanilla are shared across K, the report has one table per swept axis, and a grown grid
reruns only what is new."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.run.conftest import dtm, write_config
from tests.run.test_end_to_end import dry_run_tables, weights

pytestmark = pytest.mark.slow
MERGES = [{"name": "avg", "method": "linear"}, {"name": "ta", "method": "task_arithmetic", "parameters": {"lambda": 0.5}}]


def sweep_config(assets: Path, name: str, merges=MERGES) -> Path:
    train = {"max_steps": 2, "batch_size": 2, "max_length": 48, "learning_rate": 1e-3,
             "activation_checkpointing": False}
    return write_config(assets, f"{name}.yaml", run_dir=f"run-{name}", seeds=[0, 1], k=[1, 2], merge=merges,
                        disperse={"method": "random"},
                        train=train, eval={"tasks": ["mmlu=mmlu.jsonl"], "batch_size": 4, "num_fewshot": 0,
                                           "sub_models": False, "bootstrap_iters": 200})


@pytest.fixture(scope="module")
def sweep(assets) -> Path:
    config = sweep_config(assets, "sweep")
    assert dtm("run", str(config), "--quiet") == 0
    return config


def test_every_combination_has_its_own_outputs(sweep, assets):
    run_dir = assets / "run-sweep"
    for seed in (0, 1):
        for k in (1, 2):
            for i in range(k):
                manifest = json.loads((run_dir / f"seed-{seed}/k-{k}/sub-{i}/dtm_train.json").read_text())
                assert manifest["config"]["seed"] == seed  # training repeated per seed
            portions = json.loads((run_dir / f"seed-{seed}/k-{k}/portions/manifest.json").read_text())
            assert portions["seed"] == seed and portions["k"] == k
        # one vanilla per seed, shared by both K: it trains on all records (the seed's first K's portions)
        vanilla = json.loads((run_dir / f"seed-{seed}/vanilla/dtm_train.json").read_text())
        assert [Path(p).parent.parent.name for p in vanilla["config"]["data"]] == ["k-1"]
    assert not (run_dir / "vanilla").exists() and not (run_dir / "seed-0" / "k-1" / "vanilla").exists()
    # the avg merge of K=2 is the average of that cell's two sub-models (plain-torch oracle)
    sub0, sub1 = weights(run_dir / "seed-1/k-2/sub-0"), weights(run_dir / "seed-1/k-2/sub-1")
    merged = weights(run_dir / "seed-1/k-2/merged-avg")
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, (sub0[name] + sub1[name]) / 2, rtol=1e-6, atol=1e-7)
    assert (run_dir / "seed-0/k-1/merged-ta/dtm_merge.json").is_file()


def test_the_report_has_one_table_per_axis(sweep, assets, capsys):
    report = json.loads((assets / "run-sweep" / "report" / "report.json").read_text())
    ids = [m["id"] for m in report["models"]]
    assert ids.count("base") == 1  # evaluated once for the whole grid
    assert sorted(i for i in ids if "vanilla" in i) == ["seed-0/vanilla", "seed-1/vanilla"]
    assert len([i for i in ids if "merged" in i]) == 2 * 2 * 2
    axes = report["axes"]
    assert axes["seed"]["seeds"] == [0, 1] and axes["k"]["values"] == [1, 2]
    assert axes["merge"]["values"] == ["avg", "ta"]
    vanilla_row = next(r for r in axes["seed"]["rows"] if r["role"] == "vanilla")
    cell = vanilla_row["tasks"]["mmlu"]["value"]["score"]
    scores = [m["scores"]["mmlu"]["value"] for m in report["models"] if m["role"] == "vanilla"]
    assert cell["values"] == scores and cell["mean"] == pytest.approx(sum(scores) / 2)
    # every merged model is compared with the vanilla of its own seed
    for model in report["models"]:
        if model["role"] == "merged":
            assert model["comparisons"]["to_vanilla"]["model"] == f"seed-{model['seed']}/vanilla"
    markdown = (assets / "run-sweep" / "report" / "report.md").read_text()
    for title in ("## across seeds [0, 1]: mmlu acc", "## by K: mmlu acc", "## by merge setting: mmlu acc",
                  "## across seeds [0, 1]: mmlu log-likelihood of the gold answer"):
        assert title in markdown, markdown


def test_a_grown_grid_reruns_only_what_is_new(sweep, assets, capsys):
    grown = sweep_config(assets, "sweep", merges=MERGES + [{"name": "avg2", "method": "linear",
                                                             "parameters": {"normalize": True}}])
    tables = dry_run_tables(capsys, grown)
    plan = tables[f"dtm run {grown}"]
    to_run = sorted(name for name, row in plan.items() if row[1] != "current")
    new_merges = [f"seed-{s}/k-{k}/merged-avg2" for s in (0, 1) for k in (1, 2)]
    assert to_run == sorted(new_merges + [f"eval {m}" for m in new_merges] + ["report"])
    assert tables["estimated cost"]["grid"][1] == "2 seed(s) x K in [1, 2] x 3 merge setting(s)"


def test_sweep_config_errors_name_the_field(assets, capsys):
    from dtm_fast.errors import DtmError
    from dtm_fast.run.config import load_run_config

    cases = [({"seeds": [0, 0]}, "'seeds' lists a value twice"),
             ({"seeds": [0, float("nan")]}, "'seeds[1]' must be a whole number"),
             ({"k": [2, -1]}, "'k[1]' must be at least 1"),
             ({"k": [2, 3], "merge": {"weights": [1, 1]}}, "merge.weights cannot be given when k is swept"),
             ({"seeds": [1], "disperse": {"seed": 3}}, "'disperse.seed' is set per seed by 'seeds'"),
             ({"seeds": [1], "disperse": {}, "train": {"seed": 3}}, "'train.seed' is set per seed by 'seeds'"),
             ({"merge": [{"name": "a"}, {"name": "a"}]}, "two merge settings are named 'a'"),
             ({"merge": [{"name": "bad/name"}]}, "merge[0].name must be a short name"),
             ({"merge": []}, "'merge' must be a mapping, or a non-empty list")]
    for changes, message in cases:
        path = write_config(assets, "bad-sweep.yaml", **changes)
        with pytest.raises(DtmError, match=".*".join(map(__import__("re").escape, [str(path), message]))):
            load_run_config(path)
