"""Efficient evaluation: a LoRA adapter scored on its base through peft without a copy on disk
equals the full model peft writes; chat template and few-shot settings reach lm_eval's prompts;
batch_size auto; the request cache never unpickles a file dtm did not write; backend selection."""

from __future__ import annotations

import json
import shutil

import pytest

from dtm_fast.errors import DtmError
from dtm_fast.eval import EvalConfig, ModelSpec, evaluate
from dtm_fast.eval.harness import choose_backend
from dtm_fast.eval.pipeline import RequestCache


@pytest.fixture(scope="module")
def adapter(tiny_models, tmp_path_factory):
    """A random LoRA adapter on the tiny base, and (the oracle) the full model peft merges it into."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_models["base"]),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # peft starts B at zero; a non-zero B changes the scores
    model.save_pretrained(root / "adapter")
    model.merge_and_unload().save_pretrained(root / "full")
    AutoTokenizer.from_pretrained(tiny_models["base"]).save_pretrained(root / "full")
    return root


def test_an_adapter_scores_like_the_full_model_peft_writes(tiny_models, mmlu_file, adapter, tmp_path):
    config = EvalConfig(models=(ModelSpec("full", str(adapter / "full")),
                                ModelSpec("adapter", str(adapter / "adapter"), base=str(tiny_models["base"]))),
                        tasks=(f"mmlu={mmlu_file}",), output_dir=str(tmp_path / "r"), limit=6, batch_size=4,
                        bootstrap_iters=0)
    report = evaluate(config)
    full, through_peft = ({m["name"]: m for m in report["models"]}[n]["scores"]["mmlu"] for n in ("full", "adapter"))
    assert through_peft["value"] == full["value"]
    assert through_peft["gold_logprob"] == pytest.approx(full["gold_logprob"], abs=1e-4)
    base_report = json.loads((tmp_path / "r" / "results" / "adapter.json").read_text())
    assert base_report["path"] == str(adapter / "adapter")
    # nothing but the report was written: no merged copy of the adapter
    assert not list((tmp_path / "r").rglob("*.safetensors"))


def test_chat_template_few_shot_and_auto_batch_reach_lm_eval(tiny_models, mmlu_file, tmp_path):
    model = tmp_path / "chat-base"
    shutil.copytree(tiny_models["base"], model)
    settings = json.loads((model / "tokenizer_config.json").read_text())
    settings["chat_template"] = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
    (model / "tokenizer_config.json").write_text(json.dumps(settings))
    evaluate(EvalConfig(models=(ModelSpec("chat", str(model)),), tasks=(f"mmlu={mmlu_file}",),
                        output_dir=str(tmp_path / "r"), limit=2, num_fewshot=1, batch_size="auto",
                        apply_chat_template=True, fewshot_as_multiturn=True, bootstrap_iters=0))
    samples = [json.loads(line) for line in (tmp_path / "r" / "samples" / "chat" / "mmlu.jsonl").read_text().splitlines()]
    prompt = samples[0]["arguments"][0][0]
    # the template wraps the turns, and the one few-shot example is an earlier user/assistant turn
    assert prompt.startswith("<|system|>") or prompt.startswith("<|user|>"), prompt
    assert prompt.count("<|user|>") == 2 and prompt.count("<|assistant|>") == 2, prompt


def test_the_request_cache_refuses_a_pickle_dtm_did_not_write(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    planted = folder / "requests-mmlu.pickle"
    planted.write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR.")  # os.system('touch pwned') if unpickled
    with pytest.raises(DtmError, match="request-cache file dtm did not write"):
        RequestCache(folder).activate()
    assert not (tmp_path / "pwned").exists()
    cache = RequestCache(folder)
    planted.unlink()
    (folder / "ours.pickle").write_bytes(b"x")
    cache.record()  # what an evaluation does after lm_eval wrote its cache
    cache.activate()  # a file dtm recorded is accepted
    (folder / "ours.pickle").write_bytes(b"changed")
    with pytest.raises(DtmError, match="did not write \\(or that changed since\\)"):
        cache.activate()


@pytest.mark.parametrize("requested,device,ensemble,installed,chosen", [
    ("hf", "cuda", False, True, "hf"),
    ("auto", "cuda", False, True, "vllm"),
    ("auto", "cuda:1", False, True, "vllm"),
    ("auto", "cpu", False, True, "hf"),
    ("auto", "cuda", True, True, "hf"),     # the ensemble averages logits: hf only
    ("auto", "cuda", False, False, "hf"),
    ("vllm", "cuda", False, True, "vllm"),
])
def test_backend_selection(requested, device, ensemble, installed, chosen):
    assert choose_backend(requested, device, ensemble, vllm_installed=installed) == chosen


@pytest.mark.parametrize("device,ensemble,installed,message", [
    ("cuda", False, False, "needs the vllm package"),
    ("cpu", False, True, "runs on CUDA devices only"),
    ("cuda", True, True, "ensemble runs on the hf backend only"),
])
def test_vllm_where_it_cannot_run_is_refused(device, ensemble, installed, message):
    with pytest.raises(DtmError, match=message):
        choose_backend("vllm", device, ensemble, vllm_installed=installed)
