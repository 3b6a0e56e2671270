"""Cross-modal retrieval metrics with several positives per query (multi-caption safe)."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Hashable, Sequence

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


def positives_by_owner(owner: torch.Tensor | None, n_queries: int, n_items: int) -> list[list[int]]:
    """For each query row, the gallery items it owns: ``owner[j]`` is the row item j belongs to (several captions
    per image); without owners, row i owns item i."""
    return match_positives(torch.arange(n_queries), owner if owner is not None else torch.arange(n_items))


def match_positives(query_samples: torch.Tensor, gallery_samples: torch.Tensor,
                    labels: Sequence[Hashable] | None = None) -> list[list[int]]:
    """The hits of each query row: the gallery rows of the same sample (``query_samples[i]`` and
    ``gallery_samples[j]`` are the samples rows i and j come from), or, with ``labels`` (one per sample), the gallery
    rows whose sample has the query sample's label (Symile-M3's protocol: any image of the query's class is a hit)."""
    def key(sample: int) -> Hashable:
        return sample if labels is None else labels[sample]

    rows: dict[Hashable, list[int]] = defaultdict(list)
    for j, sample in enumerate(gallery_samples.tolist()):
        rows[key(sample)].append(j)
    return [list(rows.get(key(sample), ())) for sample in query_samples.tolist()]


def restrict_to(scores: torch.Tensor, allowed: list[torch.Tensor]) -> torch.Tensor:
    """``scores`` (Q x G) with -inf outside each row's ``allowed`` columns: a ranking of its own candidates only
    (the others rank last, after every candidate)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for i, columns in enumerate(allowed):
        keep[i, columns] = True
    return scores.masked_fill(~keep, float("-inf"))


def rerank_top_k(scores: torch.Tensor, k: int, rescore: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Scores ranking each row's top ``k`` (by ``scores``) first, in the order of ``rescore``, then the rest as before.

    ``rescore(top)`` takes the Q x k column indices of the top entries and returns Q x k values in [0, 1] (a matching
    head's P(match), as GRAM re-ranks its top candidates). Columns at -inf (not candidates) stay last and are never
    re-scored. Returned values: 1 + rescore for the re-ranked entries, -rank below them.
    """
    order = scores.argsort(dim=1, descending=True)
    ranks = torch.arange(scores.shape[1], dtype=torch.float32).expand(scores.shape[0], -1)
    out = torch.empty(scores.shape, dtype=torch.float32).scatter_(1, order, -ranks)
    top = order[:, :min(k, scores.shape[1])]
    candidate = torch.isfinite(scores.gather(1, top))
    out.scatter_(1, top, torch.where(candidate, 1.0 + rescore(top).float(), out.gather(1, top)))
    return out.masked_fill(~torch.isfinite(scores), float("-inf"))


def bidirectional_retrieval(
    a: torch.Tensor, b: torch.Tensor, b_owner: torch.Tensor | None = None, a_name: str = "a", b_name: str = "b",
    ks: tuple[int, ...] = (1, 5, 10), map_at: int | None = 10,
) -> dict[str, float]:
    """Retrieval a->b and b->a. ``b_owner[j]`` is the row of ``a`` that item j of ``b`` belongs to (several
    captions per image); without it, row i of ``a`` pairs with row i of ``b``."""
    owner = b_owner if b_owner is not None else torch.arange(b.shape[0])
    a2b = positives_by_owner(owner, a.shape[0], b.shape[0])
    b2a = [[i] for i in owner.tolist()]
    out = {}
    for name, m in (
        (f"{a_name}2{b_name}", retrieval_metrics(a, b, a2b, ks, map_at)),
        (f"{b_name}2{a_name}", retrieval_metrics(b, a, b2a, ks, map_at)),
    ):
        out.update({f"{name}_{k}": v for k, v in m.items()})
    return out
