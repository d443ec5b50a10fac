"""`dtm train` never destroys an input or a user's file: the output may not be, contain or lie
inside the model, a data file or the checkpoint directory; a non-empty directory that is not an
earlier `dtm train` output needs --overwrite, and even then only files dtm wrote are replaced.
Every refusal happens before the model is loaded."""

import json
import shutil

from tests.train.conftest import assert_one_line_error, dtm_train, tiny_args


def snapshot(directory):
    return {path.relative_to(directory).as_posix(): path.read_bytes()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def test_output_at_the_model_directory_is_refused(tiny_model, arithmetic_data, tmp_path, capsys, monkeypatch):
    model = shutil.copytree(tiny_model, tmp_path / "base")
    before = snapshot(model)
    # refused before anything is loaded: a model load would be a bug here
    import dtm_fast.train.loop as loop

    monkeypatch.setattr(loop, "build_sharded", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    for output in (model, model / "sub-0"):
        code, err = dtm_train(capsys, *tiny_args(model, arithmetic_data, output))
        relation = "is" if output == model else "is inside"
        assert_one_line_error(code, err, f"output {output} {relation} the input {model} (the model directory)")
    assert snapshot(model) == before


def test_output_at_the_data_directory_is_refused(tiny_model, tmp_path, capsys, arithmetic_data):
    data_dir = tmp_path / "portions"
    data_dir.mkdir()
    data = data_dir / "portion-0.jsonl"
    shutil.copyfile(arithmetic_data, data)
    (data_dir / "portion-1.jsonl").write_text(data.read_text())
    before = snapshot(data_dir)
    code, err = dtm_train(capsys, *tiny_args(tiny_model, data, data_dir))
    assert_one_line_error(code, err, f"output {data_dir} contains the input {data} (the data file)")
    code, err = dtm_train(capsys, *tiny_args(tiny_model, data, data))
    assert_one_line_error(code, err, f"output {data} is the input {data} (the data file)")
    assert snapshot(data_dir) == before


def test_output_and_checkpoint_directory_must_be_apart(tiny_model, arithmetic_data, tmp_path, capsys):
    checkpoints = tmp_path / "ckpt"
    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, checkpoints / "out"),
                          "--checkpoint_dir", checkpoints)
    assert_one_line_error(code, err, f"is inside the input {checkpoints} (the checkpoint directory)")
    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, tmp_path / "out2"),
                          "--checkpoint_dir", tiny_model / "ckpt")
    assert_one_line_error(code, err, f"is inside the input {tiny_model} (the model directory)")


def test_unrelated_file_is_refused_then_kept_with_overwrite(tiny_model, arithmetic_data, tmp_path, capsys):
    output = tmp_path / "existing"
    output.mkdir()
    (output / "notes.txt").write_text("my notes")
    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, output))
    assert_one_line_error(code, err, "1 file(s) that dtm train did not write (e.g. notes.txt)")
    assert sorted(p.name for p in output.iterdir()) == ["notes.txt"]

    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, output, "--overwrite"))
    assert code == 0, err
    assert (output / "notes.txt").read_text() == "my notes"
    assert (output / "model.safetensors.index.json").is_file() and (output / "dtm_train.json").is_file()
    written = json.loads((output / ".dtm-written.json").read_text())
    assert written["tool"] == "dtm train" and "notes.txt" not in written["files"]
    # a rerun over it still needs --overwrite (the foreign file is still there), and keeps it again
    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, output))
    assert_one_line_error(code, err, "notes.txt")
    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, output, "--overwrite"))
    assert code == 0 and (output / "notes.txt").read_text() == "my notes"


def test_rerun_replaces_its_own_output(tiny_model, arithmetic_data, tmp_path, capsys):
    output = tmp_path / "sub-0"
    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, output, "--fisher_samples", "2"))
    assert code == 0, err
    assert (output / "fisher.safetensors").is_file()
    first = json.loads((output / "dtm_train.json").read_text())
    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, output, "--seed", "7"))
    assert code == 0, err
    second = json.loads((output / "dtm_train.json").read_text())
    assert (first["config"]["seed"], second["config"]["seed"]) == (42, 7)
    # the first run's fisher.safetensors was dtm's and is not part of the new output: removed
    assert not (output / "fisher.safetensors").exists()
    assert not list(tmp_path.glob(".sub-0*"))


def test_a_gguf_cache_directory_dtm_did_not_write_is_never_replaced(tmp_path, monkeypatch):
    """The de-quantised GGUF base lives in <checkpoints>/base-from-gguf and is rebuilt when the GGUF
    changes; a directory of that name without dtm's record is the user's and must survive."""
    from types import SimpleNamespace

    import dtm_fast.train.loading as loading
    from dtm_fast.errors import DtmError
    from dtm_fast.train.parallel import Runtime

    model_dir = tmp_path / "gguf-model"
    model_dir.mkdir()
    (model_dir / "model.gguf").write_bytes(b"GGUF")
    checkpoints = tmp_path / "sub-0.checkpoints"
    config = SimpleNamespace(model=str(model_dir), gguf_file="model.gguf", checkpoints_path=checkpoints)
    runtime = Runtime(rank=0, world_size=1, local_rank=0, device="cpu")

    def fake_conversion(source_dir, gguf_file, target):
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"converted")

    monkeypatch.setattr(loading, "save_dequantized_gguf", fake_conversion)
    users = checkpoints / loading.GGUF_CACHE
    users.mkdir(parents=True)
    (users / "notes.txt").write_text("mine")
    try:
        loading.gguf_as_safetensors(config, runtime)
    except DtmError as error:
        assert "was not written by dtm" in str(error) and str(users) in str(error)
    else:
        raise AssertionError("a directory without dtm's record was replaced")
    assert (users / "notes.txt").read_text() == "mine"

    # dtm's own conversion (it has the record) is replaced when the GGUF file changes
    (users / "notes.txt").unlink()
    users.rmdir()
    target = loading.gguf_as_safetensors(config, runtime)
    assert (target / loading.GGUF_SOURCE_RECORD).is_file()
    (model_dir / "model.gguf").write_bytes(b"GGUF, changed")
    (target / "model.safetensors").write_bytes(b"stale")
    loading.gguf_as_safetensors(config, runtime)
    assert (target / "model.safetensors").read_bytes() == b"converted"
