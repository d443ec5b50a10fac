"""K-means dispersal on sentence embeddings of the instruction, the response or both (the DTM
paper's variants), with scikit-learn's seeded KMeans.

Cluster ids are renumbered by the first record each cluster holds, so portion 0 always holds record
0 whatever label order k-means produced. `balance` then moves records between clusters (closest
centroid first) until portion sizes differ by at most one.
"""

from __future__ import annotations

import numpy as np

from dtm_fast.disperse.methods.assignment import Assignment
from dtm_fast.errors import DtmError


def instruction_text(conversation) -> str:
    return "\n\n".join(m["content"] for m in conversation.messages if m["role"] in ("system", "user"))


def response_text(conversation) -> str:
    return "\n\n".join(m["content"] for m in conversation.messages if m["role"] == "assistant")


def balanced_labels(distances: np.ndarray, natural_sizes: np.ndarray) -> np.ndarray:
    """Assign each row to a cluster with capacities that differ by at most one, greedily taking the
    globally closest (record, centroid) pairs first. The naturally largest clusters get the extra
    record when the count does not divide evenly."""
    count, k = distances.shape
    capacity = np.full(k, count // k)
    by_size = sorted(range(k), key=lambda c: (-natural_sizes[c], c))
    capacity[by_size[:count % k]] += 1
    labels = np.full(count, -1)
    # lexsort: distance first, then record index, then cluster index (deterministic ties)
    records, clusters = np.divmod(np.arange(count * k), k)
    for flat in np.lexsort((clusters, records, distances.ravel())):
        record, cluster = records[flat], clusters[flat]
        if labels[record] < 0 and capacity[cluster] > 0:
            labels[record] = cluster
            capacity[cluster] -= 1
    return labels


def cluster_embeddings(embeddings: np.ndarray, k: int, seed: int, balance: bool) -> tuple[np.ndarray, np.ndarray]:
    """(portion of each row, natural cluster of each row), both renumbered by first occurrence."""
    try:
        from sklearn.cluster import KMeans
    except ModuleNotFoundError:
        raise DtmError("k-means dispersal needs scikit-learn: pip install 'dtm_fast[cluster]'") from None

    data = embeddings.astype(np.float64)
    kmeans = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(data)
    first_row = {}
    for row, label in enumerate(kmeans.labels_):
        first_row.setdefault(int(label), row)
    if len(first_row) < k:
        raise DtmError(f"disperse: k-means found only {len(first_row)} distinct clusters for K = {k} "
                       "(too many identical records?); lower K or use --method random")
    renumber = np.empty(k, dtype=np.int64)
    for new, (old, _) in enumerate(sorted(first_row.items(), key=lambda item: item[1])):
        renumber[old] = new
    natural = renumber[kmeans.labels_]
    if not balance:
        return natural, natural
    # column c = distance to the centroid of renumbered cluster c
    distances = kmeans.transform(data)[:, np.argsort(renumber)]  # (records, k)
    return balanced_labels(distances, np.bincount(natural, minlength=k)), natural


def assign(conversations, config, embed=None):
    if config.k > len(conversations):
        raise DtmError(f"disperse: K = {config.k} portions but only {len(conversations)} records; lower K")
    if embed is None:
        from dtm_fast.disperse.embed import Encoder

        embed = Encoder(config.encoder, config.embed_max_length, config.embed_batch_size, config.device)

    parts = []
    if config.embed in ("instruction", "both"):
        parts.append(embed([instruction_text(c) for c in conversations]))
    if config.embed in ("response", "both"):
        parts.append(embed([response_text(c) for c in conversations]))
    # "both": the two unit vectors side by side, scaled back to unit length, so instruction and
    # response weigh the same whatever the encoder's truncation cut from either
    embeddings = np.concatenate(parts, axis=1) / np.sqrt(len(parts))
    portion, natural = cluster_embeddings(embeddings, config.k, config.seed, config.balance)
    return Assignment(portion.tolist(), [f"cluster-{c}" for c in natural.tolist()])
