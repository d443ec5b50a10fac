"""`dtm run` and `dtm eval` through the real command line: bad config files, values of the wrong
shape, non-finite numbers and inputs the real run would refuse all end in one line naming the file
and field, exit code 1, no traceback, and (for the dry run) before any work."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.run.conftest import base_values, dtm, write_config


def one_line_error(capsys, *args: str) -> str:
    capsys.readouterr()
    code = dtm(*args)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_config_file_not_utf8_missing_or_a_directory(assets, capsys):
    path = assets / "latin1.yaml"
    path.write_bytes(b"run_dir: run\nk: 2\nbase_model: caf\xe9\n")
    assert f"{path}:3: not UTF-8 text (byte 0xe9" in one_line_error(capsys, "run", str(path))
    assert "no such config file" in one_line_error(capsys, "run", str(assets / "nowhere.yaml"))
    (assets / "folder.yaml").mkdir(exist_ok=True)
    assert "is a directory; give the config file itself" in one_line_error(capsys, "run", str(assets / "folder.yaml"))
    broken = assets / "broken.yaml"
    broken.write_text("k: [2\n")
    assert f"{broken}:2: not valid YAML" in one_line_error(capsys, "run", str(broken))
    date = assets / "date.yaml"
    date.write_text("k: 2001-13-45\n")
    assert f"{date}: not valid YAML" in one_line_error(capsys, "run", str(date))


@pytest.mark.parametrize("changes,fragment", [
    ({"run_dir": ["a"]}, "'run_dir' must be a path, got ['a']"),
    ({"data": {"x": 1}}, "'data' must list at least one data file"),
    ({"base_model": 3}, "'base_model' must be a path, got 3"),
    ({"gguf_file": ["x.gguf"]}, "'gguf_file' must be a file name"),
    ({"merge": 5}, "'merge' must be a mapping, or a non-empty list"),
    ({"merge": {"method": ["linear"]}}, "merge.method must be the name of a merge method"),
    ({"merge": {"dtype": 16}}, "merge.dtype must be text"),
    ({"merge": {"max_memory": [1]}}, "merge.max_memory must be a size"),
    ({"merge": {"weights": [".nan", 1]}}, "merge.weights must list 2 numbers"),
    ({"eval": [1]}, "'eval' must be a mapping"),
    ({"eval": {"tasks": 5}}, "eval.tasks must be a list of benchmarks, got 5"),
    ({"eval": {"tasks": ["mmlu=mmlu.jsonl"], "batch_size": "big"}}, "eval: 'batch_size' must be a whole number or 'auto'"),
    ({"eval": {"tasks": ["mmlu=mmlu.jsonl"], "limit": 0}}, "eval: 'limit' must be at least 1"),
    ({"eval": {"tasks": [{"name": "x", "path": "y"}]}}, "eval.tasks[0]: expected a task name"),
    ({"train": {"lora_target_modules": [1, "x"]}}, "train: lora_target_modules should be a list of text values"),
    ({"slurm": {"time": [1]}}, "slurm.time must be text"),
    ({"slurm": {"setup": [1]}}, "slurm.setup must be a list of text lines"),
    ({"launch": {"nproc_per_node": 0}}, "'nproc_per_node' must be a whole number >= 1"),
    ({"disperse": {"method": "random", "embed_max_length": "long"}}, "disperse: 'embed_max_length' must be a whole number"),
])
def test_values_of_the_wrong_shape_name_the_field(assets, capsys, changes, fragment):
    path = write_config(assets, "shape.yaml", **changes)
    err = one_line_error(capsys, "run", str(path), "--dry-run")
    assert str(path) in err and fragment in err, err


@pytest.mark.parametrize("text,fragment", [
    ("merge: {weights: [.nan, 1.0]}\n", "merge.weights must be finite numbers"),
    ("merge: {weights: [.inf, 1.0]}\n", "merge.weights must be finite numbers"),
    ("k: .inf\n", "'k' must be a whole number, got inf"),
    ("seeds: [0, .nan]\n", "'seeds[1]' must be a whole number"),
])
def test_non_finite_numbers_are_refused(assets, capsys, text, fragment):
    values = base_values()
    for key in yaml.safe_load(text):
        values.pop(key, None)
    path = assets / "finite.yaml"
    path.write_text(yaml.safe_dump(values) + text)
    err = one_line_error(capsys, "run", str(path), "--dry-run")
    assert fragment in err, err


def test_dry_run_checks_what_the_real_run_would_refuse(assets, capsys):
    bad = assets / "bad-first.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}) + "\n")
    path = write_config(assets, "dry.yaml", run_dir="run-dry", data=["bad-first.jsonl"])
    assert f"{bad}:1: message 1 (assistant) is empty" in one_line_error(capsys, "run", str(path), "--dry-run")
    latin = assets / "latin-first.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9", "completion": "x"}\n')
    path = write_config(assets, "dry.yaml", run_dir="run-dry", data=["latin-first.jsonl"])
    assert f"{latin}:1: not UTF-8" in one_line_error(capsys, "run", str(path), "--dry-run")
    path = write_config(assets, "dry.yaml", run_dir="run-dry", k=[2, 20])
    assert "k = 20 is larger than the 12 records in data" in one_line_error(capsys, "run", str(path), "--dry-run")
    path = write_config(assets, "dry.yaml", run_dir="run-dry", disperse={"method": "kmeans", "encoder": "no-encoder"})
    assert "disperse.encoder" in one_line_error(capsys, "run", str(path), "--dry-run")
    assert not (assets / "run-dry").exists()


def test_eval_task_file_and_numbers_on_the_command_line(assets, capsys, tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "\xe9"}\n')
    err = one_line_error(capsys, "eval", "--base", str(assets / "base"), "--task", f"x={latin}", "-o", str(tmp_path / "r"))
    assert f"{latin}:2: not UTF-8" in err
    for options, fragment in ((["--limit", "0"], "'limit' must be at least 1"),
                              (["--bootstrap-iters", "-1"], "'bootstrap_iters' must be at least 0"),
                              (["--batch-size", "0"], "'batch_size' must be at least 1"),
                              (["--batch-size", "huge"], "'batch_size' must be a whole number or 'auto'"),
                              (["--num-fewshot", "-2"], "'num_fewshot' must be at least 0")):
        err = one_line_error(capsys, "eval", "--base", str(assets / "base"), "--task", f"x={assets / 'mmlu.jsonl'}",
                             "-o", str(tmp_path / "r"), *options)
        assert fragment in err, err
    assert not (tmp_path / "r").exists()
