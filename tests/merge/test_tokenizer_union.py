"""Merging models with different tokenizers (tokenizer_source union / base / a model, and the
`tokenizer:` section), checked against mergekit run on the same YAML: the written vocabulary is the
same, every non-vocabulary tensor is the same, and every embedding / lm_head row is the same token
by token (mergekit numbers the tokens a union adds in hash-map order, so rows are compared by token)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_state, run_mergekit, save_llama, tiny_llama_config
from dtm_fast.cli import main as dtm

WORDS = [f"w{i}" for i in range(40)]
VOCAB_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


def save_tokenizer(directory: Path, words: list[str], added: list[str]) -> int:
    """A WordLevel tokenizer with `added` special tokens; returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{word: i + 1 for i, word in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(added)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                 "unk_token": "<unk>"}))
    return tokenizer.get_vocab_size()


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory):
    """base: w0..w39 + <|a|>; m0: base's words + y z yy + <|tool|>; m1: base's words less w3 and w5, plus y."""
    import transformers

    root = tmp_path_factory.mktemp("vocab")
    specs = {"base": (WORDS, ["<|a|>"]), "m0": (WORDS + ["y", "z", "yy"], ["<|a|>", "<|tool|>"]),
             "m1": ([w for w in WORDS if w not in ("w3", "w5")] + ["y"], [])}
    torch.manual_seed(7)
    paths = {}
    shared = None
    for index, (name, (words, added)) in enumerate(specs.items()):
        size = save_tokenizer(root / name, words, added)
        config = tiny_llama_config()
        config.vocab_size = size
        state = transformers.LlamaForCausalLM(config).state_dict()
        if shared is None:
            shared = {k: v.clone() for k, v in state.items() if k not in VOCAB_NAMES}
        generator = torch.Generator().manual_seed(50 + index)
        state = {k: (shared[k] if k in shared else v) + 0.02 * torch.randn(v.shape, generator=generator)
                 for k, v in state.items()}
        paths[name] = save_llama(root / name, state, config, torch.float32)
    return paths


def by_token(directory: Path) -> dict[str, int]:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(directory)).get_vocab()


def run_both(config_text: str, tmp_path: Path) -> tuple[Path, Path]:
    config = tmp_path / "merge.yml"
    config.write_text(config_text)
    run_mergekit(config, tmp_path / "mergekit")
    assert dtm(["merge", str(config), str(tmp_path / "dtm"), "--quiet", "--max-memory", "64MiB"]) == 0
    return tmp_path / "mergekit", tmp_path / "dtm"


def assert_same_as_mergekit(theirs_dir: Path, ours_dir: Path) -> dict[str, int]:
    theirs, ours = load_state(theirs_dir), load_state(ours_dir)
    their_vocab, our_vocab = by_token(theirs_dir), by_token(ours_dir)
    assert our_vocab.keys() == their_vocab.keys()
    assert theirs.keys() == ours.keys()
    for name in ours:
        if name in VOCAB_NAMES:
            assert ours[name].shape == theirs[name].shape, name
            for token, index in our_vocab.items():
                torch.testing.assert_close(ours[name][index], theirs[name][their_vocab[token]], rtol=2e-7,
                                           atol=1e-7, msg=f"{name} row of {token!r}")
            extra = range(len(our_vocab), ours[name].shape[0])  # padding rows
            torch.testing.assert_close(ours[name][list(extra)], theirs[name][list(extra)], rtol=2e-6, atol=1e-7)
        else:
            torch.testing.assert_close(ours[name], theirs[name], rtol=2e-7, atol=1e-7, msg=name)
    their_config = json.loads((theirs_dir / "config.json").read_text())
    assert json.loads((ours_dir / "config.json").read_text())["vocab_size"] == their_config["vocab_size"]
    return our_vocab


def test_union_vocabulary_merges_rows_as_mergekit(vocab_family, tmp_path):
    p = vocab_family
    theirs, ours = run_both(f"merge_method: linear\nbase_model: {p['base']}\n"
                            f"models:\n  - model: {p['m0']}\n    parameters: {{weight: 2.0}}\n"
                            f"  - model: {p['m1']}\n    parameters: {{weight: 1.0}}\n"
                            "parameters: {weight: 1.0}\ntokenizer_source: union\ndtype: float32\n", tmp_path)
    vocab = assert_same_as_mergekit(theirs, ours)
    assert {"y", "z", "yy", "<|tool|>", "<|a|>", "w3"} <= vocab.keys()
    # the row rule itself: z is only in m0, so every input takes m0's row and the merge is m0's row
    m0 = load_state(vocab_family["m0"])
    m0_vocab = by_token(vocab_family["m0"])
    merged = load_state(ours)["model.embed_tokens.weight"]
    torch.testing.assert_close(merged[vocab["z"]], m0["model.embed_tokens.weight"][m0_vocab["z"]])


def test_union_with_task_arithmetic_and_ties(vocab_family, tmp_path):
    p = vocab_family
    for method in ("task_arithmetic", "ties"):
        where = tmp_path / method
        where.mkdir()
        theirs, ours = run_both(f"merge_method: {method}\nbase_model: {p['base']}\n"
                                f"models:\n  - model: {p['m0']}\n    parameters: {{weight: 0.7, density: 0.5}}\n"
                                f"  - model: {p['m1']}\n    parameters: {{weight: 0.4, density: 0.5}}\n"
                                "tokenizer_source: union\ndtype: float32\n", where)
        assert_same_as_mergekit(theirs, ours)


def test_base_and_model_sources_and_the_tokenizer_section(vocab_family, tmp_path):
    p = vocab_family
    models = f"models:\n  - model: {p['m0']}\n  - model: {p['m1']}\n"
    cases = {
        "base": "tokenizer_source: base\n",
        "model": f"tokenizer_source: {p['m0']}\n",
        "section": ("tokenizer:\n  source: union\n  pad_to_multiple_of: 16\n  tokens:\n"
                    f"    z:\n      source: {p['m0']}\n      force: true\n"
                    "    w7:\n      source: {kind: zero}\n      force: true\n"
                    f"    <|new|>:\n      source: {{kind: model_token, model: {p['m1']}, token: y}}\n"
                    f"    w3:\n      source: {{kind: model_token, model: {p['m0']}, token_id: 2}}\n"),
    }
    for name, tokenizer in cases.items():
        where = tmp_path / name
        where.mkdir()
        theirs, ours = run_both(f"merge_method: linear\nbase_model: {p['base']}\n{models}"
                                f"parameters: {{weight: 1.0}}\n{tokenizer}dtype: float32\n", where)
        vocab = assert_same_as_mergekit(theirs, ours)
        if name == "section":
            assert "<|new|>" in vocab
            assert load_state(ours)["lm_head.weight"].shape[0] % 16 == 0


def dtm_error(config_text: str, tmp_path: Path, capsys) -> str:
    config = tmp_path / "bad.yml"
    config.write_text(config_text)
    assert dtm(["merge", str(config), str(tmp_path / "out"), "--quiet"]) != 0
    error = capsys.readouterr().err.strip()
    assert not (tmp_path / "out").exists()
    return error


def test_bad_tokenizer_settings_are_one_line_errors(vocab_family, tmp_path, capsys):
    p = vocab_family
    head = f"merge_method: linear\nbase_model: {p['base']}\nmodels:\n  - model: {p['m0']}\n  - model: {p['m1']}\n"
    error = dtm_error(head + f"tokenizer_source: {tmp_path / 'nowhere'}\n", tmp_path, capsys)
    assert "tokenizer_source" in error and "nowhere" in error and "\n" not in error
    error = dtm_error(head + f"tokenizer:\n  tokens:\n    z:\n      source: {p['m1']}\n", tmp_path, capsys)
    assert "has no token 'z'" in error and "\n" not in error
    error = dtm_error(head + f"tokenizer:\n  tokens:\n    z:\n      source: {vocab_family['base'].parent / 'x'}\n",
                      tmp_path, capsys)
    assert "tokens['z']" in error and "\n" not in error
    error = dtm_error(head + "tokenizer:\n  tokens:\n    q:\n      source: {kind: model_token, model: "
                      f"{p['m1']}, token: nope}}\n", tmp_path, capsys)
    assert "has no token 'nope'" in error and "\n" not in error
    error = dtm_error(head, tmp_path, capsys)  # different vocabularies and no tokenizer setting
    assert "vocabularies differ" in error and "tokenizer" in error


def test_cache_of_aligned_embeddings_is_removed(vocab_family, tmp_path):
    p = vocab_family
    config = tmp_path / "merge.yml"
    config.write_text(f"merge_method: linear\nbase_model: {p['base']}\nmodels:\n  - model: {p['m0']}\n"
                      "tokenizer_source: union\n")
    assert dtm(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 0
    assert not (tmp_path / "out.dtm-cache").exists()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == len(by_token(tmp_path / "out"))


def test_union_with_slices(vocab_family, tmp_path):
    p = vocab_family
    slices = "".join(f"  - sources:\n      - model: {p['m0']}\n        layer_range: [{i}, {i + 1}]\n"
                     f"      - model: {p['m1']}\n        layer_range: [{i}, {i + 1}]\n" for i in range(2))
    theirs, ours = run_both(f"merge_method: linear\nbase_model: {p['base']}\nparameters: {{weight: 1.0}}\n"
                            f"slices:\n{slices}tokenizer_source: union\ndtype: float32\n", tmp_path)
    assert_same_as_mergekit(theirs, ours)
