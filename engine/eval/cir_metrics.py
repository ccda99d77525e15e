"""Composed image retrieval metrics: pure functions over ranked gallery ids (fractions, 0..1).

* ``recall_at_k``: share of queries whose target is in the top K (CIRR Recall@1/5/10/50,
  FashionIQ Recall@10/50).
* ``subset_recall_at_k``: CIRR's Recall_subset@K — the ranking restricted to the query's subset
  of (6) images, with the reference image removed.
* ``map_at_k``: CIRCO's mAP@K with several ground truths per query:
  AP@K = (1 / min(K, |G|)) * sum_{k<=K} P@k * rel(k).
* ``rank_gallery``: rankings from embeddings (cosine), optionally excluding each query's
  reference image from its own ranking (CIRR's protocol; see :mod:`engine.eval.cir_protocol`).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

RECALL_KS = (1, 5, 10, 50)
SUBSET_KS = (1, 2, 3)
FASHIONIQ_KS = (10, 50)
CIRCO_KS = (5, 10, 25, 50)


def recall_at_k(
    rankings: Sequence[Sequence[Hashable]],
    targets: Sequence[Hashable],
    ks: Iterable[int] = RECALL_KS,
) -> dict[int, float]:
    if len(rankings) != len(targets):
        raise ValueError("one target per ranking")
    if not rankings:
        return {k: 0.0 for k in ks}
    return {
        k: sum(t in list(r)[:k] for r, t in zip(rankings, targets, strict=True)) / len(rankings)
        for k in ks
    }


def subset_recall_at_k(
    rankings: Sequence[Sequence[Hashable]],
    targets: Sequence[Hashable],
    references: Sequence[Hashable],
    subsets: Sequence[Iterable[Hashable]],
    ks: Iterable[int] = SUBSET_KS,
) -> dict[int, float]:
    restricted = []
    for ranking, ref, subset in zip(rankings, references, subsets, strict=True):
        members = set(subset) - {ref}
        restricted.append([g for g in ranking if g in members])
    return recall_at_k(restricted, targets, ks)


def average_precision_at_k(
    ranking: Sequence[Hashable], positives: Iterable[Hashable], k: int
) -> float:
    positives = set(positives)
    if not positives:
        return 0.0
    hits, total = 0, 0.0
    for i, g in enumerate(list(ranking)[:k], start=1):
        if g in positives:
            hits += 1
            total += hits / i  # P@i at a relevant position
    return total / min(k, len(positives))


def map_at_k(
    rankings: Sequence[Sequence[Hashable]],
    ground_truths: Sequence[Iterable[Hashable]],
    ks: Iterable[int] = CIRCO_KS,
) -> dict[int, float]:
    if len(rankings) != len(ground_truths):
        raise ValueError("one ground-truth set per ranking")
    gts = [set(g) for g in ground_truths]
    n = max(len(rankings), 1)
    return {
        k: sum(average_precision_at_k(r, g, k) for r, g in zip(rankings, gts, strict=True)) / n
        for k in ks
    }


def rank_gallery(queries, gallery, gallery_ids: Sequence[Hashable], exclude=None) -> list[list]:
    """Gallery ids by descending cosine similarity per query; ``exclude[i]`` is left out."""
    import torch
    import torch.nn.functional as F

    q = F.normalize(torch.as_tensor(queries).float(), dim=-1)
    g = F.normalize(torch.as_tensor(gallery).float(), dim=-1)
    order = (q @ g.T).argsort(dim=-1, descending=True).tolist()
    out = []
    for i, row in enumerate(order):
        ids = [gallery_ids[j] for j in row]
        if exclude is not None and exclude[i] is not None:
            ids = [x for x in ids if x != exclude[i]]
        out.append(ids)
    return out
