"""The logit ensemble of the K sub-models: at every position the K models' logits are averaged and
the average is used as one model's logits (the DTM paper's comparison of merging in weight space
with ensembling in output space). It costs K forward passes and K models in memory.

Implemented as lm_eval's HFLM with its one forward call replaced, so log-likelihood tasks keep
lm_eval's own batching, tokenisation and scoring; generation is greedy decoding on the averaged
logits with one KV cache per member.
"""

from __future__ import annotations

import inspect
import logging

import torch
from lm_eval.models.huggingface import HFLM

from dtm_fast.errors import DtmError

logger = logging.getLogger(__name__)


class LogitEnsembleLM(HFLM):
    def __init__(self, paths: list[str], **hflm_arguments):
        if len(paths) < 2:
            raise DtmError("the logit ensemble needs at least two models")
        super().__init__(pretrained=paths[0], **hflm_arguments)
        from transformers import AutoModelForCausalLM

        self.members = [self.model]
        for path in paths[1:]:
            member = AutoModelForCausalLM.from_pretrained(path, dtype=self.model.dtype).to(self.device).eval()
            first_vocab, vocab = self.model.get_output_embeddings().weight.shape[0], member.get_output_embeddings().weight.shape[0]
            if vocab != first_vocab:
                raise DtmError(f"{path}: vocabulary of {vocab} tokens, but {paths[0]} has {first_vocab}; "
                               "the ensemble averages logits token by token, so the sub-models must share a tokenizer")
            self.members.append(member)
        logger.info("logit ensemble of %d models", len(self.members))

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if attn_mask is not None or labels is not None:
            raise DtmError("the logit ensemble supports decoder-only (causal) models only")
        with torch.no_grad():
            total = None
            for member in self.members:
                logits = member(inps).logits.float()  # (batch, tokens, vocab)
                total = logits if total is None else total + logits
            return total / len(self.members)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        """Greedy decoding on the averaged logits, until EOS or a stop string in every row."""
        temperature = generation_kwargs.get("temperature", 0.0) or 0.0
        if generation_kwargs.get("do_sample") or temperature > 0:
            raise DtmError("the logit ensemble generates greedily only; the task asks for sampling "
                           f"(do_sample={generation_kwargs.get('do_sample')}, temperature={temperature})")
        attention_mask = generation_kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(context)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        sequences = context
        finished = torch.zeros(context.shape[0], dtype=torch.bool, device=context.device)
        caches = [None] * len(self.members)
        # transformers 5.x renamed the KV-cache argument and output from past_key_values to cache
        cache_names = ["cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"
                       for m in self.members]
        feed = context
        with torch.no_grad():
            for _ in range(max_length - context.shape[1]):
                # left-padded rows start counting positions at their first real token
                positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -feed.shape[1]:]
                total = None
                for index, member in enumerate(self.members):
                    output = member(input_ids=feed, attention_mask=attention_mask, position_ids=positions,
                                    use_cache=True, **{cache_names[index]: caches[index]})
                    caches[index] = getattr(output, cache_names[index])
                    logits = output.logits[:, -1].float()  # (batch, vocab)
                    total = logits if total is None else total + logits
                next_token = (total / len(self.members)).argmax(-1)
                next_token = torch.where(finished, torch.full_like(next_token, pad_id), next_token)
                sequences = torch.cat([sequences, next_token[:, None]], dim=1)
                attention_mask = torch.cat([attention_mask, (~finished).long()[:, None].to(attention_mask.dtype)], dim=1)
                finished |= next_token == self.eot_token_id
                if stop:
                    texts = self.tokenizer.batch_decode(sequences[:, context.shape[1]:])
                    finished |= torch.tensor([any(s in text for s in stop) for text in texts], device=finished.device)
                if bool(finished.all()):
                    break
                feed = next_token[:, None]
        return sequences
