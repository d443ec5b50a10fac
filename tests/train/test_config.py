"""Configuration and command-line errors name the key, the value and what to do."""

import pytest

from dtm_fast.errors import DtmError
from dtm_fast.train.config import TrainConfig, load_config
from dtm_fast.train.model import select_attention


def test_defaults_follow_the_paper_recipe():
    assert TrainConfig(finetuning="lora").lr == 3e-4
    assert TrainConfig(finetuning="full").lr == 2e-5
    defaults = TrainConfig()
    assert (defaults.max_length, defaults.batch_size, defaults.lr_scheduler) == (1024, 16, "cosine")
    assert defaults.warmup_ratio > 0


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("model: base\nlearnig_rate: 1e-4\n")
    with pytest.raises(DtmError, match=r"train.yaml: unknown config key 'learnig_rate'; did you mean 'learning_rate'"):
        load_config(path)


def test_wrong_type_names_the_field(tmp_path):
    with pytest.raises(DtmError, match="batch_size should be a whole number"):
        load_config(None, {"batch_size": "many"})
    # YAML reads 3e-4 as text; it is still accepted as a number
    assert load_config(None, {"learning_rate": "3e-4"}).lr == 3e-4


def test_world_size_that_does_not_divide_the_batch():
    config = TrainConfig(batch_size=16, micro_batch_size=2)
    assert config.gradient_accumulation(4) == 2
    with pytest.raises(DtmError, match="cannot be split over 3 ranks"):
        config.gradient_accumulation(3)


def test_bad_choice_is_named():
    with pytest.raises(DtmError, match="finetuning must be one of full, lora; got 'qlora'"):
        TrainConfig(finetuning="qlora")


def test_flash_attention_where_it_cannot_run_is_an_error():
    assert select_attention("auto", "cpu") == "sdpa"
    with pytest.raises(DtmError, match="needs a CUDA GPU"):
        select_attention("flash_attention_2", "cpu")


def test_cli_reports_bad_input_without_a_traceback(tiny_model, arithmetic_data, tmp_path, capsys):
    from dtm_fast.train.__main__ import main

    code = main(["--model", str(tiny_model), "--data", str(tmp_path / "missing.jsonl"),
                 "--output_dir", str(tmp_path / "out"), "--quiet"])
    assert code == 1
    assert "missing.jsonl: no such file" in capsys.readouterr().err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = main(["--model", str(tiny_model), "--data", str(empty), "--output_dir", str(tmp_path / "out"), "--quiet"])
    assert code == 1 and "contains no records" in capsys.readouterr().err

    code = main(["--model", str(tiny_model), "--data", str(arithmetic_data), "--output_dir", str(tmp_path / "out"),
                 "--batch_size", "6", "--micro_batch_size", "4", "--quiet"])
    assert code == 1 and "batch_size 6 is not a multiple of micro_batch_size 4" in capsys.readouterr().err


def test_base_model_without_chat_template_needs_one_named(tmp_path, arithmetic_data, capsys):
    from dtm_fast.train.__main__ import main
    from dtm_fast.train.tiny import write_tiny_llama

    bare = write_tiny_llama(tmp_path / "bare", chat_template=None)
    common = ["--model", str(bare), "--data", str(arithmetic_data), "--output_dir", str(tmp_path / "out"),
              "--max_steps", "1", "--batch_size", "2", "--max_length", "160", "--quiet"]
    assert main(common) == 1
    assert "no chat template" in capsys.readouterr().err
    assert main(common + ["--chat_template", "alpaca"]) == 0
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("key,value,expected", [
    ("lora_alpha", float("nan"), "lora_alpha should be a whole number, got nan"),
    ("learning_rate", float("inf"), "learning_rate must be a finite number, got inf"),
    ("learning_rate", float("nan"), "learning_rate must be a finite number, got nan"),
    ("warmup_ratio", float("nan"), "warmup_ratio must be a finite number, got nan"),
    ("weight_decay", float("-inf"), "weight_decay must be a finite number"),
    ("max_grad_norm", float("nan"), "max_grad_norm must be a finite number"),
    ("epochs", float("inf"), "epochs must be a finite number"),
    ("adam_epsilon", 0.0, r"adam_epsilon must be in \(0, inf\), got 0.0"),
    ("adam_beta2", 1.0, r"adam_beta2 must be in \[0, 1\), got 1.0"),
    ("lora_dropout", 1.0, r"lora_dropout must be in \[0, 1\)"),
    ("min_lr_ratio", 1.5, r"min_lr_ratio must be in \[0, 1\]"),
    ("max_shard_size_mb", float("nan"), "max_shard_size_mb must be a finite number"),
    ("peak_tflops", -1.0, r"peak_tflops must be in \(0, inf\)"),
    ("seed", -1, r"seed must be in \[0, "),
    ("batch_size", 2**40, r"batch_size must be in \[1, 2147483647\]"),
    ("epochs", 10**400, "epochs = 1000.* is too large"),
])
def test_every_number_is_finite_and_in_range(key, value, expected):
    # NaN compares false with every bound, so each check must test finiteness first
    with pytest.raises(DtmError, match=f"config: {expected}"):
        load_config(None, {key: value})


@pytest.mark.parametrize("text,expected", [
    ("lora_alpha: .nan\n", "lora_alpha should be a whole number, got nan"),
    ("learning_rate: .inf\n", "learning_rate must be a finite number, got inf"),
    ("warmup_ratio: nan\n", "warmup_ratio must be a finite number, got nan"),  # text, read as a number
    ("model: [a, b]\n", r"model should be text, got \['a', 'b'\] \(a list\)"),
    ("chat_template: {a: 1}\n", "chat_template should be text"),
    ("lora_target_modules: [q_proj, 3]\n", "lora_target_modules should be a list of text values"),
    ("lora_target_modules: []\n", "lora_target_modules needs at least one module name"),
    ("learning_rate: {value: 1}\n", "learning_rate should be a number, got {'value': 1}"),
    ("batch_size: [16]\n", "batch_size should be a whole number"),
    ("resume: true\nfresh: true\n", "resume and fresh contradict each other"),
])
def test_yaml_values_of_the_wrong_shape_name_the_field(tmp_path, text, expected):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    with pytest.raises(DtmError, match=f"config: {expected}"):
        load_config(path)


def test_config_files_that_cannot_be_read(tmp_path):
    with pytest.raises(DtmError, match="missing.yaml: no such config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(DtmError, match="is a directory; give the config file itself"):
        load_config(tmp_path)
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes(b"model: base\nchat_template: caf\xe9\n")
    with pytest.raises(DtmError, match=r"latin1.yaml:2: not UTF-8 text \(byte 0xe9 at offset 30\)"):
        load_config(latin)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: base\ndata: [a, b\n")
    with pytest.raises(DtmError, match="broken.yaml:3: not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- model\n- data\n")
    with pytest.raises(DtmError, match="expected a mapping of config keys to values, got list"):
        load_config(listing)
