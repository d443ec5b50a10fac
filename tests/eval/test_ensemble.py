"""The logit ensemble: its log-likelihoods equal a hand-computed average of the members' logits, and
its greedy generation equals a hand-written greedy loop on the averaged logits."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def ensemble(tiny_models):
    from dtm_fast.eval.ensemble import LogitEnsembleLM

    return LogitEnsembleLM([str(tiny_models["sub-0"]), str(tiny_models["sub-1"])], device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def members(tiny_models):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["sub-0"])
    return tokenizer, [LlamaForCausalLM.from_pretrained(tiny_models[n]).eval() for n in ("sub-0", "sub-1")]


def averaged_logits(models, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return sum(m(torch.tensor([ids])).logits[0].double() for m in models) / len(models)  # (tokens, vocab)


def test_log_likelihoods_equal_a_hand_computed_logit_average(ensemble, members):
    from lm_eval.api.instance import Instance

    tokenizer, models = members
    pairs = [("The capital of France is", " Paris"), ("Which of the following is true?\nAnswer:", " B"),
             ("Scenario 1 | I taught my children", " to play the xylophone.")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    results = ensemble.loglikelihood(requests)
    for (context, continuation), (log_likelihood, is_greedy) in zip(pairs, results):
        context_ids = tokenizer(context)["input_ids"]
        whole = tokenizer(context + continuation)["input_ids"]
        log_probs = torch.log_softmax(averaged_logits(models, whole), -1)
        positions = range(len(context_ids) - 1, len(whole) - 1)
        expected = sum(log_probs[p, whole[p + 1]].item() for p in positions)
        greedy = all(log_probs[p].argmax().item() == whole[p + 1] for p in positions)
        assert log_likelihood == pytest.approx(expected, abs=1e-4)
        assert is_greedy == greedy
        # and the average is not just one member's answer
        single = torch.log_softmax(averaged_logits(models[:1], whole), -1)
        assert abs(sum(single[p, whole[p + 1]].item() for p in positions) - expected) > 1e-3


def test_greedy_generation_equals_a_hand_written_loop(ensemble, members):
    from lm_eval.api.instance import Instance

    tokenizer, models = members
    contexts = ["Question: what is the pineal gland?\nAnswer:", "Hi"]  # different lengths: left padding
    max_tokens = 6
    requests = [Instance(request_type="generate_until", doc={}, idx=i,
                         arguments=(context, {"until": ["\n\n\n"], "max_gen_toks": max_tokens, "do_sample": False}))
                for i, context in enumerate(contexts)]
    outputs = ensemble.generate_until(requests)
    for context, output in zip(contexts, outputs):
        ids = tokenizer(context)["input_ids"]
        generated = []
        for _ in range(max_tokens):  # no cache, no padding: the plainest greedy loop
            next_id = int(averaged_logits(models, ids + generated)[-1].argmax())
            if next_id == tokenizer.eos_token_id:
                break
            generated.append(next_id)
        expected = tokenizer.decode(generated, skip_special_tokens=True).split("\n\n\n")[0]
        assert output == expected
