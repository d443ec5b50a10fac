"""lm_eval's HFLM with a leaner log-likelihood: the vocabulary projection and log-softmax only at
the positions that score a continuation.

lm_eval projects every position of every row onto the vocabulary and log-softmaxes all of them
(rows x length x vocab), though a request reads only its continuation's positions. For MMLU on
SmolLM2-135M (vocabulary 49,152, ~115-token prompts, single-letter answers) that is ~22% of the
forward's arithmetic and a 22 MB float32 tensor per question, for one position used. Everything
else is lm_eval's: its request grouping (one forward per context when the continuations are
single tokens), its order, its left truncation, its cache hook. The first batch of each model is
also scored lm_eval's way and compared, so a model whose head is not a plain projection (logit
soft-capping or scaling) falls back to lm_eval's path instead of scoring differently.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from tqdm import tqdm

logger = logging.getLogger(__name__)
# the projections compared on the first batch agree to float rounding, not bit for bit: the
# matmul sums in a different blocking for a few rows than for all of them
AGREEMENT = 1e-4


class ContinuationLM(HFLM):
    _checked: bool | None = None  # None: not yet compared with lm_eval's path; then whether it agreed

    def _sliceable(self) -> bool:
        model = self.model
        return (self.backend == "causal" and self.batch_size != "auto" and self._checked is not False
                and callable(getattr(model, "get_decoder", None)) and model.get_output_embeddings() is not None)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if not self._sliceable():
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        # lm_eval's own keys: longest first, and one forward for the requests that share context +
        # continuation[:-1] (the four " A".." D" of an MMLU question)
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                            group_by="contexts" if self.logits_cache else None,
                            group_fn=lambda r: r[-2] + r[-1][:-1])
        results = []
        progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                        desc="Running loglikelihood requests")
        for chunk in collator.get_batched(n=override_bs or self.batch_size):
            # what lm_eval feeds the model: context + continuation, truncated from the left, less its last token
            rows = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in chunk]
            spans = [(len(row) - len(continuation), len(row)) for row, (_, _, continuation) in zip(rows, chunk)]
            scored = self._scored_logprobs(rows, spans)
            if self._checked is None:
                self._checked = self._agrees_with_full_head(rows, spans, scored)
                if not self._checked:
                    logger.warning("%s: the sliced head differs from the model's own logits; scoring the "
                                   "rest lm_eval's way", type(self.model).__name__)
                    return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            for (request, context, continuation), logprobs in zip(chunk, scored):
                logprobs = logprobs.unsqueeze(0)  # (1, continuation length, vocab)
                greedy = logprobs.argmax(dim=-1)
                for request_str, tokens, logprobs in collator.get_cache(
                        req_str=request, cxt_toks=context, cont_toks=continuation, logits=logprobs):
                    tokens = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(0)
                    exact = bool((greedy[:, -tokens.shape[1]:] == tokens).all())
                    answer = (float(torch.gather(logprobs, 2, tokens.unsqueeze(-1)).sum()), exact)
                    results.append(answer)
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                    progress.update(1)
        progress.close()
        return collator.get_original(results)

    def _padded(self, rows: list[list[int]]) -> torch.Tensor:
        # right padding with token 0, as lm_eval pads; no attention mask, as lm_eval passes none: a
        # causal model's real positions never see the padding after them
        width = max(map(len, rows))
        return torch.tensor([row + [0] * (width - len(row)) for row in rows], dtype=torch.long, device=self.device)

    @torch.no_grad()
    def _scored_logprobs(self, rows: list[list[int]], spans: list[tuple[int, int]]) -> list[torch.Tensor]:
        hidden = self.model.get_decoder()(input_ids=self._padded(rows)).last_hidden_state  # (rows, width, hidden)
        picked = torch.cat([hidden[i, start:end] for i, (start, end) in enumerate(spans)])  # (positions, hidden)
        logprobs = F.log_softmax(self.model.get_output_embeddings()(picked), dim=-1, dtype=self.softmax_dtype)
        return list(logprobs.split([end - start for start, end in spans]))

    @torch.no_grad()
    def _agrees_with_full_head(self, rows, spans, scored) -> bool:
        full = F.log_softmax(self._model_call(self._padded(rows)), dim=-1, dtype=self.softmax_dtype)
        return all(torch.allclose(full[i, start:end], mine, atol=AGREEMENT, rtol=0)
                   for i, ((start, end), mine) in enumerate(zip(spans, scored)))
