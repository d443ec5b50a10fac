"""Bad dtm.yaml files fail before any work, with the file and the field named."""

from __future__ import annotations

import pytest

from dtm_fast.errors import DtmError
from dtm_fast.run.config import load_run_config
from tests.run.conftest import base_values, dtm, write_config


def error_of(assets, **changes) -> str:
    path = write_config(assets, "bad.yaml", **changes)
    with pytest.raises(DtmError) as caught:
        load_run_config(path)
    message = str(caught.value)
    assert str(path) in message  # every config error names the file
    return message


def test_unknown_keys_are_named_with_their_section(assets):
    path = write_config(assets, "bad.yaml")
    path.write_text(path.read_text() + "vanila: false\n")
    with pytest.raises(DtmError, match=r"unknown key 'vanila'; did you mean 'vanilla'\?"):
        load_run_config(path)
    train = dict(base_values()["train"], lr=1e-4)
    assert "train: unknown key 'lr'" in error_of(assets, train=train)
    assert "merge: unknown key 'methd'; did you mean 'method'?" in error_of(assets, merge={"methd": "linear"})
    assert "unknown config key(s) 'method_name'" in error_of(assets, disperse={"method_name": "random"})
    assert "eval: unknown config key(s) 'task'" in error_of(assets, eval={"task": ["mmlu"], "tasks": ["mmlu"]})


def test_bad_values_name_the_field(assets):
    assert "data[1]" in error_of(assets, data=["data.jsonl", "missing.jsonl"])
    assert "missing.jsonl: no such file" in error_of(assets, data=["data.jsonl", "missing.jsonl"])
    assert "'k' must be at least 1, got 0" in error_of(assets, k=0)
    assert "base_model" in error_of(assets, base_model="no-such-model")
    train = dict(base_values()["train"], learning_rate="fast")
    assert "train: learning_rate should be a number, got 'fast'" in error_of(assets, train=train)
    assert "'train.output_dir' is set by dtm run itself" in error_of(assets, train={"output_dir": "x"})
    assert "merge.weights must list 2 numbers" in error_of(assets, merge={"method": "linear", "weights": [1.0]})
    assert "merge.method: unknown merge method 'avg'" in error_of(assets, merge={"method": "avg"})
    assert "eval.tasks[0]" in error_of(assets, eval={"tasks": ["mmlu=nowhere.jsonl"]})
    assert "eval.tasks must list at least one benchmark" in error_of(assets, eval={})


def test_k_larger_than_the_records_fails_before_training(assets, capsys):
    path = write_config(assets, "too-many.yaml", run_dir="run-too-many", k=13)
    assert dtm("run", str(path), "--quiet") == 1
    message = capsys.readouterr().err
    assert f"{path}: k = 13 is larger than the 12 records in data" in message
    assert not (assets / "run-too-many" / "portions").exists()
    assert not (assets / "run-too-many" / "sub-0").exists()


def test_stage_options_are_checked(assets, capsys):
    path = write_config(assets, "stages.yaml", run_dir="run-stages")
    assert dtm("run", str(path), "--stage", "train", "--index", "3", "--quiet") == 1
    assert "--index between 0 and 2 (sub-0, sub-1, vanilla)" in capsys.readouterr().err
    assert dtm("run", str(path), "--index", "0", "--quiet") == 1
    assert "--index only goes with --stage train" in capsys.readouterr().err
    # finish before the training jobs: refused, naming what is missing
    assert dtm("run", str(path), "--stage", "finish", "--quiet") == 1
    err = capsys.readouterr().err
    assert "--stage finish: disperse, sub-0, sub-1, vanilla not current yet" in err
    assert "[dtm run]" not in err  # nothing ran


@pytest.mark.parametrize("field,value", [("base_model", "\n"), ("data", ["data.jsonl", "x\tb.jsonl"]),
                                         ("run_dir", "runs/\r")])
def test_a_path_with_a_control_character_is_refused_on_one_line(assets, field, value):
    message = error_of(assets, **{field: value})
    assert "control character" in message and "\n" not in message and "\t" not in message
