"""The deletion rule shared by every command: only files dtm recorded writing are ever removed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dtm_fast.errors import DtmError
from dtm_fast.io.owned_dir import OWNERSHIP_FILE, check_replaceable, check_separate, publish, written_files


def stage(parent: Path, files: dict[str, str]) -> Path:
    staging = parent / ".out.staging"
    staging.mkdir()
    for name, text in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(text)
    return staging


def test_new_output_is_renamed_into_place_with_its_record(tmp_path):
    publish(stage(tmp_path, {"a.txt": "1", "sub/b.txt": "2"}), tmp_path / "out", "dtm test")
    assert (tmp_path / "out" / "sub" / "b.txt").read_text() == "2"
    assert written_files(tmp_path / "out") == ("dtm test", ["a.txt", "sub/b.txt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replacing_own_output_removes_only_its_files(tmp_path):
    out = tmp_path / "out"
    publish(stage(tmp_path, {"old.txt": "old", "keep-name.txt": "v1"}), out, "dtm test")
    check_replaceable(out, "dtm test", overwrite=False, replace_own=True)
    publish(stage(tmp_path, {"keep-name.txt": "v2"}), out, "dtm test")
    assert sorted(p.name for p in out.iterdir()) == [OWNERSHIP_FILE, "keep-name.txt"]
    assert (out / "keep-name.txt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no retired directory left behind


def test_foreign_file_is_refused_without_overwrite_and_kept_with_it(tmp_path):
    out = tmp_path / "out"
    publish(stage(tmp_path, {"model.bin": "v1", "marker.json": "{}"}), out, "dtm test")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DtmError, match="notes.txt"):
        check_replaceable(out, "dtm test", overwrite=False, replace_own=True)
    check_replaceable(out, "dtm test", overwrite=True, replace_own=True)
    publish(stage(tmp_path, {"new.bin": "v2", "marker.json": "{}"}), out, "dtm test", marker="marker.json")
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "model.bin").exists()  # dtm's old file went
    assert written_files(out) == ("dtm test", ["marker.json", "new.bin"])


def test_a_foreign_file_the_new_output_would_replace_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("the user's own")
    with pytest.raises(DtmError, match="config.json"):
        publish(stage(tmp_path, {"config.json": "{}"}), out, "dtm test")
    assert (out / "config.json").read_text() == "the user's own"


def test_a_plain_directory_of_the_user_is_never_emptied(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "train.jsonl").write_text("{}\n")
    with pytest.raises(DtmError, match="did not write"):
        check_replaceable(out, "dtm test", overwrite=False, replace_own=True)


def test_crafted_record_cannot_point_outside(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / OWNERSHIP_FILE).write_text(json.dumps({"tool": "dtm test", "files": ["../victim.txt", str(victim)]}))
    publish(stage(tmp_path, {"a.txt": "1"}), out, "dtm test")
    assert victim.read_text() == "precious"


def test_output_overlapping_an_input_is_refused(tmp_path):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    for output in (model, model / "sub", tmp_path):
        with pytest.raises(DtmError, match="model"):
            check_separate(output, [("model", model)])
    link = tmp_path / "link"
    os.symlink(model, link)
    with pytest.raises(DtmError, match="is the input .* \\(the model\\)"):
        check_separate(link, [("model", model)])
    check_separate(tmp_path / "elsewhere", [("model", model)])


def test_output_that_is_a_file_or_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DtmError, match="not a directory"):
        check_replaceable(tmp_path / "file", "dtm test", overwrite=True, replace_own=True)
    with pytest.raises(DtmError, match="is a file"):
        check_replaceable(tmp_path / "file" / "out", "dtm test", overwrite=True, replace_own=True)
