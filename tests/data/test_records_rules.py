"""The record rules live in data/records.py and hold for every command that reads records: an empty
or whitespace-only message is refused by `dtm train` exactly as by `dtm disperse`, and bytes that
are not UTF-8 are named by file and line."""

from __future__ import annotations

import json

import pytest

from dtm_fast.data.records import count_records, first_record, load_conversations
from dtm_fast.errors import DtmError


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("reply", ["", " ", "\n\t "])
def test_the_trainer_reader_refuses_an_empty_reply(tmp_path, reply):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]}
    path = write(tmp_path / "d.jsonl", [GOOD, bad])
    with pytest.raises(DtmError, match=r"d.jsonl:2: message 1 \(assistant\) is empty"):
        load_conversations([path])


def test_first_turn_only_checks_only_the_turns_used(tmp_path):
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                           {"role": "user", "content": "q2"}, {"role": "assistant", "content": ""}]}
    path = write(tmp_path / "d.jsonl", [record])
    assert len(load_conversations([path], first_turn_only=True)[0].messages) == 2
    with pytest.raises(DtmError, match="message 3"):
        load_conversations([path])


def test_dtm_train_refuses_an_empty_reply_in_one_line(tmp_path, capsys):
    from dtm_fast.cli import main
    from dtm_fast.train.tiny import write_tiny_llama

    write_tiny_llama(tmp_path / "base", hidden_size=32, layers=1, heads=2, seed=0)
    bad = {"instruction": "say something", "output": "   "}
    data = write(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, bad])
    code = main(["train", "--model", str(tmp_path / "base"), "--data", str(data),
                 "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert f"{data}:2: message 1 (assistant) is empty" in err


def test_not_utf8_names_the_line_and_counting_is_cheap(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n" + b'{"prompt": "\xe9", "completion": "x"}\n')
    assert count_records(path) == 2  # blank lines are not records
    assert first_record(path).fields == GOOD  # the bad third line is never read
    with pytest.raises(DtmError, match=r"d.jsonl:3: not UTF-8 text \(byte 0xe9"):
        load_conversations([path])
