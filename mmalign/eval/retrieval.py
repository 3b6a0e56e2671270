"""Cross-modal retrieval metrics with several positives per query (multi-caption safe)."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch


def retrieval_metrics(
    query: torch.Tensor,
    gallery: torch.Tensor,
    positives: list[list[int]],
    ks: tuple[int, ...] = (1, 5, 10),
    map_at: int | None = None,
    chunk: int = 1024,
    similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Recall@k and mean average precision of ranking ``gallery`` by cosine similarity to each ``query``.

    R@k: fraction of queries with at least one positive among the top k. mAP: mean over queries of AP over the
    full ranking. ``map_at=k`` adds ``mAP@k`` as reported for AudioCaps/Clotho: sum of precision@rank at each
    positive ranked within the top k, divided by min(#positives, k). ``similarity(query_rows, gallery)`` replaces
    the dot product (``query`` is then anything indexed by query along dim 0, e.g. Q x K x D tuples for N-way).
    """
    if len(positives) != query.shape[0]:
        raise ValueError(f"positives has {len(positives)} entries for {query.shape[0]} queries")
    if any(len(p) == 0 for p in positives):
        raise ValueError("every query needs at least one positive")
    hits = {k: 0.0 for k in ks}
    ap_sum, ap_at_sum = 0.0, 0.0
    for start in range(0, query.shape[0], chunk):
        rows = query[start:start + chunk]
        sim = rows.float() @ gallery.float().T if similarity is None else similarity(rows, gallery).float()
        order = sim.argsort(dim=1, descending=True)
        pos = torch.zeros_like(sim, dtype=torch.bool)
        for i, p in enumerate(positives[start:start + chunk]):
            pos[i, p] = True
        ranked = pos.gather(1, order)  # True where the item at that rank is a positive
        first = ranked.float().argmax(dim=1)  # rank (0-based) of the first positive
        for k in ks:
            hits[k] += (first < k).sum().item()
        cum = ranked.float().cumsum(dim=1)
        rank_1 = torch.arange(1, sim.shape[1] + 1, dtype=torch.float32)
        precision = cum / rank_1
        n_pos = ranked.sum(dim=1).float()
        ap_sum += ((precision * ranked).sum(dim=1) / n_pos).sum().item()
        if map_at:
            top = ranked[:, :map_at].float()
            ap_at_sum += ((precision[:, :map_at] * top).sum(dim=1) / n_pos.clamp(max=map_at)).sum().item()
    n = query.shape[0]
    out = {f"R@{k}": hits[k] / n for k in ks}
    out["mAP"] = ap_sum / n
    if map_at:
        out[f"mAP@{map_at}"] = ap_at_sum / n
    return out


def positives_by_group(query_groups: torch.Tensor, gallery_groups: torch.Tensor) -> list[list[int]]:
    """For each query row, the gallery rows of its group: the sample each row belongs to (several captions per
    image, on either side), or its label (every item of the same class counts as correct)."""
    members: dict[int, list[int]] = defaultdict(list)
    for j, group in enumerate(gallery_groups.tolist()):
        members[group].append(j)
    return [members.get(group, []) for group in query_groups.tolist()]


def row_samples(owner: torch.Tensor | None, n_rows: int) -> torch.Tensor:
    """The sample each row belongs to: ``owner`` where rows have one (several per sample), else row i is sample i."""
    return owner if owner is not None else torch.arange(n_rows)


def bidirectional_retrieval(
    a: torch.Tensor, b: torch.Tensor, b_owner: torch.Tensor | None = None, a_name: str = "a", b_name: str = "b",
    ks: tuple[int, ...] = (1, 5, 10), map_at: int | None = 10, a_owner: torch.Tensor | None = None,
) -> dict[str, float]:
    """Retrieval a->b and b->a. ``b_owner[j]`` is the sample item j of ``b`` belongs to, ``a_owner[i]`` that of row
    i of ``a`` (several captions per image, on either side); without one, row i is sample i. Rows of the same sample
    are each other's positives. Any group ids work as owners, e.g. labels (same-class items are positives)."""
    groups_a, groups_b = row_samples(a_owner, a.shape[0]), row_samples(b_owner, b.shape[0])
    out = {}
    for name, m in (
        (f"{a_name}2{b_name}", retrieval_metrics(a, b, positives_by_group(groups_a, groups_b), ks, map_at)),
        (f"{b_name}2{a_name}", retrieval_metrics(b, a, positives_by_group(groups_b, groups_a), ks, map_at)),
    ):
        out.update({f"{name}_{k}": v for k, v in m.items()})
    return out


def first_equal_rows(x: torch.Tensor, tolerance: float = 1e-6, chunk: int = 1024) -> torch.Tensor:
    """For each row of L2-normalised ``x``, the first row equal to it (cosine >= 1 - ``tolerance``; the same caption
    in two batches differs by about 1e-7): rows that embed the same input (a caption repeated across samples), or
    that the model maps to one point, share one index."""
    first = torch.empty(x.shape[0], dtype=torch.long)
    for start in range(0, x.shape[0], chunk):
        equal = (x[start:start + chunk].float() @ x.float().T) >= 1 - tolerance
        first[start:start + chunk] = equal.float().argmax(dim=1)  # the first True (a row always equals itself)
    return first


def shared_items(x: torch.Tensor, samples: torch.Tensor) -> tuple[int, int]:
    """(distinct embeddings, items whose embedding equals one of another sample) among the rows of ``x``
    (``samples``: each row's sample). Shared items make retrieval ambiguous: a query finds the equal items of other
    samples as high as its own, and they count as wrong."""
    first = first_equal_rows(x).tolist()
    samples_of: dict[int, set[int]] = defaultdict(set)
    for f, sample in zip(first, samples.tolist()):
        samples_of[f].add(sample)
    return len(samples_of), sum(len(samples_of[f]) > 1 for f in first)
