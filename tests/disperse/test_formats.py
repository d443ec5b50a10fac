"""Every input file type and record format disperses, and the portions read back as the same records."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dtm_fast.data.records import load_conversations
from dtm_fast.disperse import DisperseConfig, disperse
from dtm_fast.errors import DtmError

from .data_factory import (alpaca_records, messages_records, prompt_completion_records, sharegpt_records,
                           write_jsonl)


def portion_records(result) -> list[dict]:
    return [json.loads(line) for path in result.portion_files for line in path.read_text().splitlines()]


def by_key(records: list[dict]) -> list[str]:
    return sorted(json.dumps(record, sort_keys=True) for record in records)


def write_input(tmp_path: Path, kind: str, records: list[dict]) -> Path:
    if kind == "jsonl":
        return write_jsonl(tmp_path / "data.jsonl", records)
    if kind == "json":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(records))
        return path
    if kind == "parquet":
        import pyarrow
        import pyarrow.parquet

        path = tmp_path / "data.parquet"
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)
        return path
    if kind == "csv":
        path = tmp_path / "data.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
        return path
    if kind == "saved":
        import datasets

        path = tmp_path / "saved"
        datasets.Dataset.from_list(records).save_to_disk(str(path))
        return path
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,records,fmt", [
    ("jsonl", alpaca_records(10), "alpaca"),
    ("json", sharegpt_records(10), "sharegpt"),
    ("parquet", messages_records(10), "messages"),
    ("csv", prompt_completion_records(10), "prompt_completion"),
    ("saved", messages_records(10), "messages"),
])
def test_each_input_kind_and_format_round_trips(tmp_path, kind, records, fmt):
    path = write_input(tmp_path, kind, records)
    result = disperse(DisperseConfig(inputs=(str(path),), output_dir=str(tmp_path / "out"), k=3))
    assert result.manifest["inputs"][0]["format"] == fmt
    assert by_key(portion_records(result)) == by_key(records)
    # the trainer's loader reads each portion back in the same format
    for portion in result.portion_files:
        assert load_conversations(portion, fmt=fmt)


@pytest.mark.parametrize("records,list_field", [(messages_records(6, turns=3), "messages"),
                                                (sharegpt_records(6, turns=3), "conversations")])
def test_first_turn_only_keeps_the_first_exchange_in_the_original_format(tmp_path, records, list_field):
    path = write_jsonl(tmp_path / "multi.jsonl", records)
    whole = disperse(DisperseConfig(inputs=(str(path),), output_dir=str(tmp_path / "whole"), k=2))
    assert by_key(portion_records(whole)) == by_key(records)
    first = disperse(DisperseConfig(inputs=(str(path),), output_dir=str(tmp_path / "first"), k=2, first_turn_only=True))
    expected = []
    for record in records:
        messages = record[list_field]
        # hand-computed: system (messages format only) + first question + first answer
        keep = 3 if list_field == "messages" else 2
        expected.append({**record, list_field: messages[:keep]})
    assert by_key(portion_records(first)) == by_key(expected)


def test_mixed_formats_need_the_messages_output(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", alpaca_records(4))
    sharegpt = write_jsonl(tmp_path / "s.jsonl", sharegpt_records(4, turns=1))
    with pytest.raises(DtmError, match="mix record formats"):
        disperse(DisperseConfig(inputs=(str(alpaca), str(sharegpt)), output_dir=str(tmp_path / "out"), k=2))
    result = disperse(DisperseConfig(inputs=(str(alpaca), str(sharegpt)), output_dir=str(tmp_path / "out"), k=2,
                                     output_format="messages"))
    written = portion_records(result)
    assert len(written) == 8
    record_zero = next(r for r in written if r.get("id") == 0)
    assert record_zero["messages"] == [{"role": "user", "content": "Question number 0: what is 0 plus 0?\n\nshow work"},
                                       {"role": "assistant", "content": "The answer is 0."}]
    assert record_zero["source"] == "math"
    hello = next(r for r in written if r.get("id") == "sg1")
    assert hello["messages"] == [{"role": "user", "content": "hello 1/0"}, {"role": "assistant", "content": "hi 1/0"}]
    assert result.manifest["portions"][0]["by_input"].keys() <= {str(alpaca), str(sharegpt)}
