"""Cross-modal retrieval metrics with several positives per query (multi-caption safe)."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F


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


def row_samples(owner: torch.Tensor | None, n_rows: int) -> torch.Tensor:
    """The sample each row belongs to: ``owner`` where rows have one (several per sample), else row i is sample i."""
    return owner if owner is not None else torch.arange(n_rows)


def row_groups(samples: torch.Tensor, labels: Sequence[Hashable] | None = None) -> torch.Tensor:
    """What decides a hit for each row: its sample (``samples[i]``), or with ``labels`` (one per sample) its
    sample's label, as an index into the distinct labels in order of appearance."""
    if labels is None:
        return samples
    index = {label: i for i, label in enumerate(dict.fromkeys(labels))}
    return torch.tensor([index[labels[s]] for s in samples.tolist()], dtype=torch.long)


def match_positives(query_samples: torch.Tensor, gallery_samples: torch.Tensor,
                    labels: Sequence[Hashable] | None = None) -> list[list[int]]:
    """The hits of each query row: the gallery rows of the same sample (``query_samples[i]`` and
    ``gallery_samples[j]`` are the samples rows i and j come from; several rows per sample on either side), or,
    with ``labels`` (one per sample), the gallery rows whose sample has the query sample's label (Symile-M3's
    protocol: any image of the query's class is a hit). Any group ids work as samples (:func:`row_groups`)."""
    members = rows_by_group(row_groups(gallery_samples, labels))
    return [list(members.get(group, ())) for group in row_groups(query_samples, labels).tolist()]


def rows_by_group(groups: torch.Tensor) -> dict[int, list[int]]:
    """The rows of each group id in ``groups`` (one id per row), in row order."""
    rows: dict[int, list[int]] = defaultdict(list)
    for j, group in enumerate(groups.tolist()):
        rows[group].append(j)
    return rows


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
    ks: tuple[int, ...] = (1, 5, 10), map_at: int | None = 10, a_owner: torch.Tensor | None = None,
) -> dict[str, float]:
    """Retrieval a->b and b->a. ``b_owner[j]`` is the sample item j of ``b`` belongs to, ``a_owner[i]`` that of row
    i of ``a`` (several captions per image, on either side); without one, row i is sample i. Rows of the same sample
    are each other's positives. Any group ids work as owners, e.g. labels (same-class items are positives)."""
    groups_a, groups_b = row_samples(a_owner, a.shape[0]), row_samples(b_owner, b.shape[0])
    out = {}
    for name, m in (
        (f"{a_name}2{b_name}", retrieval_metrics(a, b, match_positives(groups_a, groups_b), ks, map_at)),
        (f"{b_name}2{a_name}", retrieval_metrics(b, a, match_positives(groups_b, groups_a), ks, map_at)),
    ):
        out.update({f"{name}_{k}": v for k, v in m.items()})
    return out


def first_equal_rows(x: torch.Tensor, tolerance: float = 1e-6, chunk: int = 1024) -> torch.Tensor:
    """For each row of ``x``, the first row equal to it (cosine >= 1 - ``tolerance``; the same caption in two
    batches differs by about 1e-7): rows that embed the same input (a caption repeated across samples), or that the
    model maps to one point, share one index."""
    x = F.normalize(x.float(), dim=-1)  # embeddings without output_norm l2 (Symile's LayerNorm) are not unit length
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
