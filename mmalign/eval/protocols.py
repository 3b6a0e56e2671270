"""Retrieval protocols: who ranks what, what counts as a hit, and among which candidates.

A *side* of a retrieval is one modality (its items, possibly several per sample, e.g. captions) or a tuple of
modalities (one row per sample). Each query row ranks the gallery rows by a score: the dot product when both sides
are one modality, otherwise the model's N-way score (``nway``) of each tuple against each item, so a tuple can rank
items (Symile's (ECG, labs) -> chest X-ray) and an item can rank tuples (GRAM's text -> (video, audio)).

What counts as a hit (``match``): the gallery rows of the query's own sample (``"item"``), or of any sample with the
query sample's label (``"label"``, Symile-M3's protocol). Optionally each query ranks only its own candidates
(``candidates``, Symile-MIMIC's protocol, :mod:`.candidates`), and the top k of each ranking are re-ranked by the
model's matching head (``rerank``, GRAM's data-anchor matching).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

from ..errors import ConfigError, DataError
from .nway import nway_scores
from .retrieval import match_positives, rerank_top_k, restrict_to, retrieval_metrics, row_samples, rows_by_group

Scores = Callable[[torch.Tensor], torch.Tensor]  # query row indices (Qc) -> Qc x G scores


@dataclass(frozen=True)
class Side:
    """One side of a retrieval: its modalities, their embedding rows (N x D each) and the sample of each row."""

    names: list[str]
    rows: dict[str, torch.Tensor]
    sample: torch.Tensor  # N: index of the sample (in the embedded data) each row comes from


def make_side(emb: dict, names: list[str]) -> Side:
    """A side from ``embed_shards`` output: one modality's rows, or a tuple of modalities with one row per sample."""
    n_samples = len(emb["keys"])
    if len(names) == 1:
        rows = emb["embeddings"][names[0]]
        return Side(names, {names[0]: rows}, row_samples(emb["owners"][names[0]], rows.shape[0]))
    for name in names:
        owner = emb["owners"][name]
        if owner is not None and not torch.equal(owner, torch.arange(n_samples)):
            raise ConfigError(f"{name!r} has several items per sample (e.g. captions), so it cannot be part of a "
                              f"tuple of modalities; use it alone on its side")
    return Side(names, {name: emb["embeddings"][name] for name in names}, torch.arange(n_samples))


def score_function(query: Side, gallery: Side, method: str) -> Scores:
    """Scores of query rows against every gallery row: the dot product between two single modalities, the N-way
    score ``method`` between a tuple and single items (in either role)."""
    if len(query.names) > 1 and len(gallery.names) > 1:
        raise ConfigError(f"query {query.names} and gallery {gallery.names} are both tuples; one side must be a "
                          f"single modality")
    if len(query.names) == 1 and len(gallery.names) == 1:
        q, g = query.rows[query.names[0]], gallery.rows[gallery.names[0]]
        return lambda idx: q[idx].float() @ g.float().T
    if len(gallery.names) == 1:
        g = gallery.rows[gallery.names[0]]
        return lambda idx: nway_scores({n: x[idx] for n, x in query.rows.items()}, g, method)
    q = query.rows[query.names[0]]
    return lambda idx: nway_scores(gallery.rows, q[idx], method).T


@dataclass(frozen=True)
class Candidates:
    """The query rows a candidates file lists, and the gallery rows each of them ranks."""

    rows: torch.Tensor  # query row indices
    allowed: dict[int, torch.Tensor]  # query row -> its gallery rows
    source: str  # the file
    keys: list[str]  # sample keys of the embedded data (for errors)


def candidate_sets(candidates: dict[str, list[str]], query: Side, gallery: Side, keys: list[str],
                   source: str) -> Candidates:
    """The query rows whose sample the candidates file ``source`` lists, each with the gallery rows it ranks (every
    row of each candidate sample). ``keys``: the sample keys of the embedded data."""
    index = {key: i for i, key in enumerate(keys)}
    absent = [key for key in candidates if key not in index]
    if absent:
        raise DataError(f"{source}: query {absent[0]!r} is not a sample of the data with every evaluated modality")
    gallery_rows = rows_by_group(gallery.sample)
    allowed = {}
    for i, sample in enumerate(query.sample.tolist()):
        listed = candidates.get(keys[sample])
        if listed is not None:
            allowed[i] = torch.tensor(sorted(j for key in listed for j in gallery_rows[index[key]]), dtype=torch.long)
    return Candidates(torch.tensor(list(allowed), dtype=torch.long), allowed, source, keys)


def matching_rescore(model, query: Side, gallery: Side) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``rescore(query_rows, top)``: the model's matching head's P(match) of each query row with each of its top
    gallery rows (Qc x k), for :func:`.retrieval.rerank_top_k`. The two sides must hold the head's modalities."""
    head = model.config.matching
    if head is None:
        raise ConfigError("--rerank needs a model with a matching head (trained with loss gram, itm_ratio > 0)")
    if sorted(query.names + gallery.names) != sorted(head.modalities):
        raise ConfigError(f"--rerank: the matching head scores ({', '.join(head.modalities)}) tuples; query and "
                          f"gallery hold {', '.join(query.names + gallery.names)}")

    @torch.no_grad()
    def rescore(query_rows: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        k = top.shape[1]
        embeddings = {n: x[query_rows].repeat_interleave(k, dim=0) for n, x in query.rows.items()}
        embeddings.update({n: x[top.reshape(-1)] for n, x in gallery.rows.items()})
        return model.match_probability(embeddings).cpu().view(-1, k)

    return rescore


def rank(query: Side, gallery: Side, scores: Scores, ks: tuple[int, ...], labels: Sequence[Hashable] | None = None,
         candidates: Candidates | None = None, rerank: tuple[int, Callable] | None = None) -> dict[str, float]:
    """R@k, mAP and mAP@10 of the query rows ranking the gallery rows by ``scores``.

    ``labels`` (one per sample): hits are the rows with the query's label, else of its own sample. ``candidates``:
    only the listed query rows, each ranking its own gallery rows. ``rerank``: ``(k, rescore)``, the top k of each
    ranking re-ranked by ``rescore`` (:func:`matching_rescore`).
    """
    rows = torch.arange(query.sample.shape[0]) if candidates is None else candidates.rows
    positives = match_positives(query.sample[rows], gallery.sample, labels)
    if candidates is not None:
        positives = [sorted(set(p) & set(candidates.allowed[r].tolist())) for p, r in zip(positives, rows.tolist())]
        missed = next((r for p, r in zip(positives, rows.tolist()) if not p), None)
        if missed is not None:
            what = "has its label" if labels is not None else "is its own sample"
            raise DataError(f"{candidates.source}: no candidate of query {candidates.keys[query.sample[missed]]!r} "
                            f"{what}; every query needs a hit among its candidates")

    def similarity(idx: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        s = scores(idx)
        if candidates is not None:
            s = restrict_to(s, [candidates.allowed[i] for i in idx.tolist()])
        if rerank is not None:
            k, rescore = rerank
            s = rerank_top_k(s, k, lambda top: rescore(idx, top))
        return s

    return retrieval_metrics(rows, torch.arange(gallery.sample.shape[0]), positives, ks, map_at=10,
                             similarity=similarity)
