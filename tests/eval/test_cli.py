"""`dtm eval` on the command line: roles from flags, the table on stdout, the report on disk."""

from __future__ import annotations

import argparse
import json

import pytest

from dtm_fast.errors import DtmError
from dtm_fast.eval import cli as eval_cli


def run_cli(argv: list[str]) -> int:
    """The `dtm eval` command on its own (the full `dtm` registry also needs the other commands)."""
    parser = argparse.ArgumentParser(prog="dtm eval")
    eval_cli.configure(parser)
    return eval_cli.run(parser.parse_args(argv))


def test_cli_writes_the_report_with_roles_from_flags(tiny_models, mmlu_file, tmp_path, capsys):
    output = tmp_path / "report"
    code = run_cli(["--base", str(tiny_models["base"]), "--sub", str(tiny_models["sub-0"]),
                    "--sub", f"second={tiny_models['sub-1']}", str(tiny_models["merged"]),
                    "--task", f"{mmlu_file}:acc", "-o", str(output), "--limit", "3", "--quiet"])
    assert code == 0
    report = json.loads((output / "report.json").read_text())
    assert [(m["name"], m["role"]) for m in report["models"]] == [
        ("base", "base"), ("sub-0", "sub"), ("second", "sub"), ("merged", "model")]
    assert report["tasks"] == [{"name": "mmlu", "metric": "acc,none", "measures": ["value", "gold_logprob"]}]
    assert report["base"] == "base"
    printed = capsys.readouterr().out
    assert "alignment tax (difference to base)" in printed and "second" in printed


def test_unknown_lm_eval_task_and_unknown_metric(tiny_models, mmlu_file, tmp_path):
    with pytest.raises(DtmError, match="lm_eval has no task 'mmlu_typo'"):
        run_cli(["--base", str(tiny_models["base"]), "--task", "mmlu_typo", "-o", str(tmp_path / "r1")])
    with pytest.raises(DtmError, match="has no metric 'f1'.*acc,none"):
        run_cli(["--base", str(tiny_models["base"]), "--task", f"{mmlu_file}:f1", "-o", str(tmp_path / "r2"),
                 "--limit", "2", "--quiet"])
    assert not (tmp_path / "r2" / "report.json").exists()
