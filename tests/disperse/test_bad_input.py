"""Bad input gives a clear error naming the file, line or field, and never loses earlier output."""

from __future__ import annotations

import argparse
import json

import pytest

from dtm_fast.disperse import cli as disperse_cli
from dtm_fast.disperse import DisperseConfig, disperse
from dtm_fast.errors import DtmError

from .data_factory import alpaca_records, write_jsonl


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    with pytest.raises(DtmError, match=r"bad.jsonl:2: not valid JSON"):
        disperse(DisperseConfig(inputs=(str(path),), output_dir=str(tmp_path / "out"), k=1))


@pytest.mark.parametrize("line,message", [
    ('{}', r"bad.jsonl:2: record has no field 'instruction'"),
    ('{"instruction": "q", "output": "   "}', r"bad.jsonl:2: message 1 \(assistant\) is empty"),
    ('{"instruction": "", "output": "answer"}', r"bad.jsonl:2: message 0 \(user\) is empty"),
])
def test_empty_records_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n' + line + "\n")
    with pytest.raises(DtmError, match=message):
        disperse(DisperseConfig(inputs=(str(path),), output_dir=str(tmp_path / "out"), k=1))


def test_empty_file_and_too_large_k(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DtmError, match="contains no records"):
        disperse(DisperseConfig(inputs=(str(empty),), output_dir=str(tmp_path / "out"), k=1))
    small = write_jsonl(tmp_path / "small.jsonl", alpaca_records(3))
    with pytest.raises(DtmError, match="K = 4 portions but only 3 records"):
        disperse(DisperseConfig(inputs=(str(small),), output_dir=str(tmp_path / "out"), k=4))


def test_unknown_format_method_and_config_key():
    with pytest.raises(DtmError, match="unknown format 'yaml'"):
        DisperseConfig(inputs=("x.jsonl",), output_dir="out", k=2, format="yaml")
    with pytest.raises(DtmError, match="unknown method 'spectral'"):
        DisperseConfig(inputs=("x.jsonl",), output_dir="out", k=2, method="spectral")
    with pytest.raises(DtmError, match=r"unknown config key\(s\) 'n_portions'"):
        DisperseConfig.from_dict({"inputs": "x.jsonl", "output_dir": "out", "n_portions": 2})
    with pytest.raises(DtmError, match="needs an encoder"):
        DisperseConfig(inputs=("x.jsonl",), output_dir="out", k=2, method="kmeans")


def test_existing_output_is_never_lost(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", alpaca_records(10))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DtmError, match="did not write"):
        disperse(DisperseConfig(inputs=(str(data),), output_dir=str(foreign), k=2))
    # --overwrite writes beside a file dtm did not write, and never deletes it
    disperse(DisperseConfig(inputs=(str(data),), output_dir=str(foreign), k=2, overwrite=True))
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert (foreign / "portion-1.jsonl").is_file()

    out = tmp_path / "out"
    first = disperse(DisperseConfig(inputs=(str(data),), output_dir=str(out), k=2))
    saved = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DtmError, match="--overwrite"):
        disperse(DisperseConfig(inputs=(str(data),), output_dir=str(out), k=3))
    with pytest.raises(DtmError, match="only 10 records"):  # fails after the checks: nothing replaced
        disperse(DisperseConfig(inputs=(str(data),), output_dir=str(out), k=11, overwrite=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == saved
    replaced = disperse(DisperseConfig(inputs=(str(data),), output_dir=str(out), k=3, overwrite=True))
    assert replaced.manifest["counts"] == [4, 3, 3] and first.manifest["k"] == 2
    assert sorted(p.name for p in out.iterdir()) == [".dtm-written.json", "manifest.json"] + [
        f"portion-{i}.jsonl" for i in range(3)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary left behind


def run_cli(argv: list[str]) -> int:
    """The `dtm disperse` command on its own (the full `dtm` registry also needs the other commands)."""
    parser = argparse.ArgumentParser(prog="dtm disperse")
    disperse_cli.configure(parser)
    return disperse_cli.run(parser.parse_args(argv))


def test_cli_writes_portions_and_reports_bad_columns(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", alpaca_records(9))
    assert run_cli([str(data), "-o", str(tmp_path / "out"), "-k", "3", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"] == [3, 3, 3]
    with pytest.raises(DtmError, match="record has no field 'nope'"):
        run_cli([str(data), "-o", str(tmp_path / "out2"), "-k", "2", "--method", "field", "--field", "nope"])
    assert not (tmp_path / "out2").exists()
