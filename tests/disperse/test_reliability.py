"""`dtm disperse` through the real command line: a bad input file or parameter ends in one line that
names the place (file and line, or the field), exit code 1 and no traceback; reruns compare inputs by
content; --overwrite removes only files dtm wrote."""

from __future__ import annotations

import json
import os

import pytest

from dtm_fast.cli import main

from .data_factory import alpaca_records, write_jsonl


def dtm(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["disperse", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("suffix,content,where", [
    (".jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n', ":2: not UTF-8"),
    (".json", b'[{"instruction": "a",\n "output": "\xff"}]', ":2: not UTF-8"),
    (".csv", b'instruction,output\na,b\nc,\xe9t\xe9\n', ":3: not UTF-8"),
])
def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path, capsys, suffix, content, where):
    data = tmp_path / f"latin1{suffix}"
    data.write_bytes(content)
    code, _, err = dtm(capsys, str(data), "-o", str(tmp_path / "out"), "-k", "1")
    assert_one_line_error(code, err, f"{data}{where}")
    assert not (tmp_path / "out").exists()


def test_a_directory_or_a_missing_file_as_data(tmp_path, capsys):
    code, _, err = dtm(capsys, str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "out"), "-k", "1")
    assert_one_line_error(code, err, "missing.jsonl: no such file")
    (tmp_path / "folder").mkdir()
    code, _, err = dtm(capsys, str(tmp_path / "folder"), "-o", str(tmp_path / "out"), "-k", "1")
    assert_one_line_error(code, err, "folder", "save_to_disk")


@pytest.mark.parametrize("options,fragment", [
    (["-k", "0"], "'k' must be at least 1, got 0"),
    (["-k", "2", "--seed", "-1"], "'seed' must be at least 0"),
    (["-k", "2", "--max-length", "0"], "'embed_max_length' must be at least 1"),
    (["-k", "2", "--batch-size", "-3"], "'embed_batch_size' must be at least 1"),
])
def test_numeric_parameters_are_checked(tmp_path, capsys, alpaca_file, options, fragment):
    code, _, err = dtm(capsys, str(alpaca_file), "-o", str(tmp_path / "out"), *options)
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 2.5, True, "3"])
def test_k_from_python_or_yaml_must_be_a_whole_number(value):
    from dtm_fast.disperse import DisperseConfig
    from dtm_fast.errors import DtmError

    with pytest.raises(DtmError, match="disperse: 'k' must be a whole number"):
        DisperseConfig(inputs=("x.jsonl",), output_dir="out", k=value)


@pytest.mark.parametrize("reply", ["", "   \n\t"])
def test_an_empty_reply_is_refused_naming_the_line(tmp_path, capsys, reply):
    data = write_jsonl(tmp_path / "data.jsonl", alpaca_records(3) + [{"instruction": "q", "output": reply}])
    code, _, err = dtm(capsys, str(data), "-o", str(tmp_path / "out"), "-k", "2")
    assert_one_line_error(code, err, f"{data}:4: message 1 (assistant) is empty")


def test_a_rerun_naming_the_input_by_another_path_is_current(tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "data.jsonl", alpaca_records(8))
    out = tmp_path / "out"
    code, _, err = dtm(capsys, str(data), "-o", str(out), "-k", "2", "--quiet")
    assert code == 0 and "wrote 2 portions" in err
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    monkeypatch.chdir(tmp_path)
    code, _, err = dtm(capsys, "data.jsonl", "-o", "out", "-k", "2", "--quiet")
    assert code == 0, err
    assert "already current" in err and "nothing written" in err
    assert "wrote" not in err  # nothing was written, and the message does not claim it
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_overwrite_removes_only_what_dtm_wrote(tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", alpaca_records(9))
    out = tmp_path / "out"
    assert dtm(capsys, str(data), "-o", str(out), "-k", "3", "--quiet")[0] == 0
    (out / "notes.txt").write_text("mine")
    code, _, err = dtm(capsys, str(data), "-o", str(out), "-k", "2", "--quiet")
    assert_one_line_error(code, err, "--overwrite")
    assert dtm(capsys, str(data), "-o", str(out), "-k", "2", "--overwrite", "--quiet")[0] == 0
    names = sorted(p.name for p in out.iterdir())
    # the old portion-2 (written by dtm) is gone, the user's notes stay
    assert names == [".dtm-written.json", "manifest.json", "notes.txt", "portion-0.jsonl", "portion-1.jsonl"]
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "manifest.json").read_text())["k"] == 2


def test_an_output_written_before_ownership_records_is_replaced_file_by_file(tmp_path, capsys):
    """A dispersal made by an earlier version (no .dtm-written.json): its manifest's files are dtm's."""
    data = write_jsonl(tmp_path / "data.jsonl", alpaca_records(9))
    out = tmp_path / "out"
    assert dtm(capsys, str(data), "-o", str(out), "-k", "3", "--quiet")[0] == 0
    os.remove(out / ".dtm-written.json")
    (out / "keep.txt").write_text("mine")
    assert dtm(capsys, str(data), "-o", str(out), "-k", "2", "--overwrite", "--quiet")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [".dtm-written.json", "keep.txt", "manifest.json",
                                                     "portion-0.jsonl", "portion-1.jsonl"]


def test_the_output_inside_the_input_directory_is_refused(tmp_path, capsys):
    from datasets import Dataset

    Dataset.from_list(alpaca_records(4)).save_to_disk(str(tmp_path / "saved"))
    code, _, err = dtm(capsys, str(tmp_path / "saved"), "-o", str(tmp_path / "saved" / "portions"), "-k", "2")
    assert_one_line_error(code, err, "is inside the input")
