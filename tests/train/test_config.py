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
