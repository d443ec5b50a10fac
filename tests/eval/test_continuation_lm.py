"""ContinuationLM (the vocabulary projection only at the continuation's positions) against lm_eval's
own HFLM, the oracle, on the same requests: MMLU prompts with single-letter answers, multi-token
continuations, contexts longer than the model's window (left truncation), odd batch sizes."""

from __future__ import annotations

import pytest

from dtm_fast.eval.tasks import load_mmlu_jsonl

pytestmark = pytest.mark.filterwarnings("ignore")


def _requests(mmlu_file):
    from lm_eval.api.instance import Instance

    pairs = []
    for doc in load_mmlu_jsonl(mmlu_file, limit=5):
        prompt = f"{doc['question'].strip()}\n" + "".join(f"{l}. {c}\n" for l, c in zip("ABCD", doc["choices"])) + "Answer:"
        pairs += [(prompt, f" {letter}") for letter in "ABCD"]  # one forward per question scores all four
        pairs.append((prompt, " " + doc["choices"][doc["answer"]]))  # a multi-token continuation
    pairs.append(("word " * 300, " the end of a long one"))  # longer than max_length: truncated from the left
    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


def _models(path, batch_size):
    from lm_eval.models.huggingface import HFLM

    from dtm_fast.eval.continuation_lm import ContinuationLM

    arguments = {"pretrained": str(path), "device": "cpu", "batch_size": batch_size, "max_length": 64}
    return HFLM(**arguments), ContinuationLM(**arguments)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_log_likelihoods_equal_lm_evals(mmlu_file, tiny_models, batch_size):
    requests = _requests(mmlu_file)
    oracle, fast = _models(tiny_models["merged"], batch_size)
    projected = []
    fast.model.get_output_embeddings().register_forward_hook(lambda _m, inputs, _o: projected.append(inputs[0].shape))
    expected, got = oracle.loglikelihood(requests), fast.loglikelihood(requests)
    assert fast._checked is True
    assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
    assert [value for value, _ in got] == pytest.approx([value for value, _ in expected], abs=1e-4, rel=0)
    assert len({value for value, _ in expected[:4]}) == 4  # the tiny model tells the four letters apart
    # the head projects whole rows once (the first batch, scored lm_eval's way to compare), else only
    # the scored positions, each shared context once
    assert sum(len(shape) == 3 for shape in projected) == 1
    scored_positions = sum(len(fast.tok_encode(r.args[1])) for r in requests)
    assert 0 < sum(shape[0] for shape in projected if len(shape) == 2) < scored_positions


def test_a_head_that_is_not_the_plain_projection_falls_back_to_lm_eval(mmlu_file, tiny_models):
    requests = _requests(mmlu_file)
    oracle, fast = _models(tiny_models["merged"], 4)
    for lm in (oracle, fast):  # a scaled head, as some models have (logit scaling, soft-capping)
        plain = lm._model_call
        lm._model_call = lambda inputs, plain=plain, **kwargs: 3 * plain(inputs, **kwargs)
    expected, got = oracle.loglikelihood(requests), fast.loglikelihood(requests)
    assert fast._checked is False
    assert [value for value, _ in got] == pytest.approx([value for value, _ in expected], abs=1e-5, rel=0)
