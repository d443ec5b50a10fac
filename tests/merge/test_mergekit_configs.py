"""mergekit configs as mergekit reads them, checked by running mergekit on the same YAML: the base
of a method that ignores it is merged as an input, a per-model parameter given at the top level
applies to every model, a conditional that matches nothing falls back to the level above, and
parameters a method does not use are ignored with a warning. Plus the mergekit-yaml options users
bring, hub ids from the local cache, tokenizer sources and chat templates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import load_state, run_mergekit
from dtm_fast.cli import main as dtm


def both(config_text: str, tmp_path: Path, capsys=None) -> tuple[dict, dict, str]:
    config = tmp_path / "merge.yml"
    config.write_text(config_text)
    run_mergekit(config, tmp_path / "mergekit")
    assert dtm(["merge", str(config), str(tmp_path / "dtm"), "--quiet"]) == 0
    err = capsys.readouterr().err if capsys is not None else ""
    return load_state(tmp_path / "mergekit"), load_state(tmp_path / "dtm"), err


def assert_same(theirs: dict, ours: dict) -> None:
    assert theirs.keys() == ours.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=2e-6, atol=2e-7, msg=name)


def test_linear_merges_the_base_model_as_an_input(llama_family, tmp_path):
    paths = llama_family["fp32"]
    theirs, ours, _ = both(f"merge_method: linear\nbase_model: {paths['base']}\nparameters: {{weight: 1.0}}\n"
                           f"models:\n  - model: {paths['m0']}\n  - model: {paths['m1']}\n    parameters: {{weight: 3}}\n"
                           "dtype: float32\n", tmp_path)
    assert_same(theirs, ours)
    base, m0 = load_state(paths["base"]), load_state(paths["m0"])
    name = "model.layers.0.mlp.up_proj.weight"
    m1 = load_state(paths["m1"])
    torch.testing.assert_close(ours[name], (base[name] + m0[name] + 3 * m1[name]) / 5)


def test_top_level_and_conditional_parameters_resolve_as_in_mergekit(llama_family, tmp_path):
    paths = llama_family["fp32"]
    theirs, ours, _ = both(
        f"merge_method: task_arithmetic\nbase_model: {paths['base']}\n"
        "parameters:\n  weight: 0.5\n  lambda: 0.8\n"
        f"models:\n  - model: {paths['m0']}\n"
        f"  - model: {paths['m1']}\n    parameters:\n      weight:\n        - filter: mlp\n          value: 1.5\n"
        f"  - model: {paths['m2']}\n    parameters:\n      weight: [0.2, 0.9]\n"
        "dtype: float32\n", tmp_path)
    assert_same(theirs, ours)


def test_unused_parameters_are_ignored_and_named(llama_family, tmp_path, capsys):
    paths = llama_family["fp32"]
    theirs, ours, err = both(
        f"merge_method: slerp\nbase_model: {paths['base']}\nparameters:\n  t: 0.3\n  density: 0.5\n"
        f"models:\n  - model: {paths['base']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {paths['m0']}\n    parameters: {{weight: 0.5}}\n"
        "dtype: float32\n", tmp_path, capsys)
    assert "ignores:" in err and "density (parameters)" in err and "weight (" in err
    assert theirs.keys() == ours.keys()


@pytest.fixture
def with_tokenizers(llama_family, tmp_path):
    """Copies of the base and one fine-tune, each with its own tokenizer files."""
    paths = {}
    for name in ("base", "m0"):
        target = tmp_path / f"{name}-tok"
        shutil.copytree(llama_family["fp32"][name], target)
        (target / "tokenizer_config.json").write_text(json.dumps({"chat_template": f"{{{{ '{name}' }}}}",
                                                                  "model_max_length": 64}))
        (target / "special_tokens_map.json").write_text(json.dumps({"eos_token": f"<{name}>"}))
        paths[name] = target
    return paths


def test_tokenizer_source_and_chat_template(with_tokenizers, tmp_path):
    base, model = with_tokenizers["base"], with_tokenizers["m0"]
    config = tmp_path / "merge.yml"
    config.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {model}\n"
                      f"tokenizer_source: {model}\nchat_template: chatml\n")
    assert dtm(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 0
    assert json.loads((tmp_path / "out" / "special_tokens_map.json").read_text())["eos_token"] == "<m0>"
    template = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"]
    assert "<|im_start|>" in template and (tmp_path / "out" / "chat_template.jinja").read_text() == template
    config.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {model}\n"
                      "chat_template: auto\n")
    assert dtm(["merge", str(config), str(tmp_path / "auto"), "--quiet"]) == 0
    assert json.loads((tmp_path / "auto" / "tokenizer_config.json").read_text())["chat_template"] == "{{ 'm0' }}"


def test_model_card_and_the_config_beside_the_output(llama_family, tmp_path):
    paths = llama_family["fp32"]
    config = tmp_path / "merge.yml"
    text = f"merge_method: ties\nbase_model: {paths['base']}\nmodels:\n  - model: {paths['m0']}\n    parameters: {{density: 0.5}}\n"
    config.write_text(text)
    assert dtm(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "mergekit_config.yml").read_text() == text
    card = (tmp_path / "out" / "README.md").read_text()
    assert "**ties**" in card and str(paths["m0"]) in card and "density: 0.5" in card
    assert dtm(["merge", "--method", "linear", str(paths["m0"]), str(paths["m1"]), "-o", str(tmp_path / "cli"),
                "--quiet"]) == 0
    assert not (tmp_path / "cli" / "README.md").exists()  # the command line asks for a card explicitly
    import yaml

    written = yaml.safe_load((tmp_path / "cli" / "mergekit_config.yml").read_text())
    assert written["merge_method"] == "linear" and len(written["models"]) == 2


def test_mergekit_cli_options(llama_family, tmp_path, capsys):
    paths = llama_family["fp32"]
    common = ["merge", "--method", "linear", str(paths["m0"]), str(paths["m1"]), "--quiet"]
    assert dtm([*common, "-o", str(tmp_path / "shards"), "--out-shard-size", "20K", "-j", "1",
                "--write-model-card", "--no-copy-tokenizer", "--random-seed", "3"]) == 0
    index = json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())
    state = load_state(tmp_path / "shards")
    shards: dict[str, list[int]] = {}
    for name, file in index["weight_map"].items():
        shards.setdefault(file, []).append(state[name].numel())
    assert len(shards) > 2
    for sizes in shards.values():  # at most 20K parameters, or one tensor larger than that on its own
        assert sum(sizes) <= 20_000 or len(sizes) == 1
    assert (tmp_path / "shards" / "README.md").is_file()
    assert dtm([*common, "-o", str(tmp_path / "x"), "--lazy-unpickle", "--allow-crimes"]) == 1
    err = capsys.readouterr().err
    assert "--lazy-unpickle is a mergekit-yaml option" in err and "--allow-crimes" in err
    if not Path("/dev/nvidiactl").exists():
        assert dtm([*common, "-o", str(tmp_path / "x"), "--cuda"]) == 1
        assert "--backend triton cannot run here" in capsys.readouterr().err


def fake_hub_cache(root: Path, repo: str, model_dir: Path) -> Path:
    """The local Hugging Face cache layout of one snapshot of `repo` (what a download leaves)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("a" * 40)
    shutil.copytree(model_dir, snapshot)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("a" * 40)
    return snapshot


def test_hub_ids_come_from_the_local_cache_only(llama_family, tmp_path, monkeypatch, capsys):
    paths = llama_family["fp32"]
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "someone/tiny-ft", paths["m0"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    config = tmp_path / "merge.yml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: someone/tiny-ft\n  - model: {paths['m1']}\n")
    assert dtm(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 0
    merged, m0, m1 = load_state(tmp_path / "out"), load_state(paths["m0"]), load_state(paths["m1"])
    name = "model.norm.weight"
    torch.testing.assert_close(merged[name], (m0[name] + m1[name]) / 2)
    config.write_text(f"merge_method: linear\nmodels:\n  - model: someone/absent-model\n  - model: {paths['m1']}\n")
    assert dtm(["merge", str(config), str(tmp_path / "out2"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "someone/absent-model" in err and "not in the local Hugging Face cache" in err and "never downloads" in err
