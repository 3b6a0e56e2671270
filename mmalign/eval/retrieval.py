"""Cross-modal retrieval metrics with several positives per query (multi-caption safe)."""
from __future__ import annotations

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


def positives_by_owner(owner: torch.Tensor | None, n_queries: int, n_items: int) -> list[list[int]]:
    """For each query row, the gallery items it owns: ``owner[j]`` is the row item j belongs to (several captions
    per image); without owners, row i owns item i."""
    positives: list[list[int]] = [[] for _ in range(n_queries)]
    for j, i in enumerate((owner if owner is not None else torch.arange(n_items)).tolist()):
        positives[i].append(j)
    return positives


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
