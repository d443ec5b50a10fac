"""Mistakes a user can make with `dtm train`, each through the real command: exit code 1, one line
that names the file or field and the way out, never a traceback."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.train.conftest import assert_one_line_error, dtm_train, malicious_pickle, tiny_args


def write_config(tmp_path, text, name="train.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_non_utf8_config_in_a_real_process(tiny_model, arithmetic_data, tmp_path):
    config = write_config(tmp_path, f"model: {tiny_model}\ndata: [{arithmetic_data}]\n".encode()
                          + b"output_dir: out\nchat_template: caf\xe9\n")
    result = subprocess.run([sys.executable, "-m", "dtm_fast.cli", "train", str(config)], capture_output=True,
                            text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert_one_line_error(result.returncode, result.stderr, f"{config}:4: not UTF-8 text (byte 0xe9")


@pytest.mark.parametrize("case,expected", [
    ("missing", "no-such.yaml: no such config file"),
    ("directory", "is a directory; give the config file itself"),
])
def test_config_path_missing_or_a_directory(tmp_path, capsys, case, expected):
    path = tmp_path / "no-such.yaml" if case == "missing" else tmp_path
    assert_one_line_error(*dtm_train(capsys, "train", path), expected)


@pytest.mark.parametrize("line,expected", [
    ("output_dir: [a, b]", "config: output_dir should be text, got ['a', 'b'] (a list)"),
    ("lora_target_modules: [q_proj, 1, {a: b}]", "config: lora_target_modules should be a list of text values"),
    ("learning_rate: {value: 0.001}", "config: learning_rate should be a number, got {'value': 0.001}"),
    ("lora_alpha: .nan", "config: lora_alpha should be a whole number, got nan"),
    ("warmup_ratio: .nan", "config: warmup_ratio must be a finite number, got nan"),
    ("learning_rate: .inf", "config: learning_rate must be a finite number, got inf"),
])
def test_yaml_values_of_the_wrong_shape(tiny_model, arithmetic_data, tmp_path, capsys, line, expected):
    config = write_config(tmp_path, f"model: {tiny_model}\ndata: [{arithmetic_data}]\noutput_dir: {tmp_path / 'o'}\n"
                                    f"{line}\n")
    assert_one_line_error(*dtm_train(capsys, "train", config), expected)


def test_non_finite_numbers_on_the_command_line(tiny_model, arithmetic_data, tmp_path, capsys):
    args = tiny_args(tiny_model, arithmetic_data, tmp_path / "o")
    assert_one_line_error(*dtm_train(capsys, *args, "--lora_dropout", "nan"), "lora_dropout must be a finite number")
    assert_one_line_error(*dtm_train(capsys, *args, "--max_grad_norm", ".inf"), "max_grad_norm must be a finite number")


@pytest.mark.parametrize("kind,template,expected", [
    ("inline", "{% for m in messages %}{{ m['content'] }", "the inline chat_template: Jinja syntax error on line 1"),
    ("file", "{% for m in messages %}\n{{ m['content'] }}\n{% endfor\n", "template.jinja: Jinja syntax error on line 3"),
    ("raising", "{{ raise_exception('only user/assistant turns') }}", "the chat template fails on it: only user/assistant"),
])
def test_bad_jinja_chat_template(tiny_model, arithmetic_data, tmp_path, capsys, kind, template, expected):
    if kind == "file":
        (tmp_path / "template.jinja").write_text(template)
        template = str(tmp_path / "template.jinja")
    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, tmp_path / "o", "--chat_template", template))
    assert_one_line_error(code, err, expected)


def test_pickle_only_model_is_refused_unloaded(tiny_model, arithmetic_data, tmp_path, capsys):
    model = tmp_path / "pickled"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_model / name, model / name)
    marker = tmp_path / "pwned"
    (model / "pytorch_model.bin").write_bytes(malicious_pickle(marker))
    code, err = dtm_train(capsys, *tiny_args(model, arithmetic_data, tmp_path / "o"))
    line = assert_one_line_error(code, err, f"model: {model} holds only pickle weights (*.bin); dtm train never unpickles")
    assert "Convert it to safetensors once" in line
    assert not marker.exists()


def unwritable_directory():
    """A directory this process cannot create entries in, even as root (sysfs refuses mkdir)."""
    import tempfile

    for candidate in ("/sys", "/proc"):
        try:
            os.rmdir(tempfile.mkdtemp(dir=candidate))
        except OSError:
            return candidate
    pytest.skip("no unwritable directory on this machine")


def test_unwritable_output_and_checkpoint_locations(tiny_model, arithmetic_data, tmp_path, capsys):
    location = unwritable_directory()
    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, f"{location}/dtm-sub-0"))
    assert_one_line_error(code, err, f"output_dir {location}/dtm-sub-0: cannot write in {location}")
    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, tmp_path / "o"),
                          "--checkpoint_dir", f"{location}/dtm-checkpoints")
    assert_one_line_error(code, err, f"checkpoint_dir {location}/dtm-checkpoints: cannot write in {location}")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, a_file / "sub-0"))
    assert_one_line_error(code, err, f"{a_file} is a file, not a directory")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file whatever its permissions")
def test_unreadable_model_and_data(tiny_model, arithmetic_data, tmp_path, capsys):
    model = shutil.copytree(tiny_model, tmp_path / "base")
    model.chmod(0)
    try:
        code, err = dtm_train(capsys, *tiny_args(model, arithmetic_data, tmp_path / "o"))
        assert_one_line_error(code, err, f"model: cannot read {model}")
    finally:
        model.chmod(0o755)
    data = tmp_path / "data.jsonl"
    shutil.copyfile(arithmetic_data, data)
    data.chmod(0)
    code, err = dtm_train(capsys, *tiny_args(tiny_model, data, tmp_path / "o"))
    assert_one_line_error(code, err, str(data))
