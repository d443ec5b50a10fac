"""The report files are strict JSON (a NaN from lm_eval becomes null) and the tables mark the
intervals that exclude zero; built from hand-made per-question values, no model needed."""

from __future__ import annotations

import json
import math

import pytest

from dtm_fast.eval.report import build_report, to_markdown, write_report


def result(name, role, values, logprobs, seed=None):
    return {"id": name, "name": name, "role": role, "path": name, "seed": seed,
            "scores": {"mmlu": {"metric": "acc,none", "value": sum(values) / len(values), "stderr": math.nan,
                                "samples": len(values), "gold_logprob": sum(logprobs) / len(logprobs)}},
            "per_question": {"mmlu": {"keys": [f"mmlu:{i}" for i in range(len(values))], "value": values,
                                      "gold_logprob": logprobs}}}


def refuse_constant(name):
    raise AssertionError(f"{name} is not JSON")


def test_report_json_is_strict_and_marks_intervals(tmp_path):
    base = result("base", "base", [1, 0, 0, 1, 0, 1], [-2.0, -3.0, -2.5, -1.0, -4.0, -2.0])
    merged = result("merged", "merged", [1, 0, 1, 1, 0, 1], [-1.0, -2.0, -1.5, -0.1, -3.0, -1.0])  # +1 nat or so each
    report = build_report([base, merged], ["mmlu"], {"seed": 1}, {"tool_version": "t"}, 500, 0)
    paths = write_report(report, tmp_path)
    saved = json.loads(paths["json"].read_text(), parse_constant=refuse_constant)
    assert saved["models"][0]["scores"]["mmlu"]["stderr"] is None
    interval = saved["models"][1]["comparisons"]["to_base"]["tasks"]["mmlu"]["gold_logprob"]
    assert interval["estimate"] == pytest.approx(sum([1.0, 1.0, 1.0, 0.9, 1.0, 1.0]) / 6)
    assert 0.9 <= interval["low"] <= interval["estimate"] <= interval["high"] <= 1.0 and interval["excludes_zero"]
    markdown = to_markdown(saved)
    assert "*" in markdown.split("| merged | merged |")[1].splitlines()[0]  # the log-likelihood delta is marked
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
