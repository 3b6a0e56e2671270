"""Evaluation entry points shared by ``mmalign eval`` and the end of training: shards in, headline numbers out.

A query is one modality, or several ("image,audio"): an N-way query scores each candidate (a class prompt, a
gallery item) against the tuple of its given modalities with the model's N-way score (``mmalign.eval.nway``:
``mip`` for Symile, ``volume`` for GRAM, ``cosine`` = sum of cosines for pairwise objectives). Only samples that
carry every modality involved are evaluated.
"""
from __future__ import annotations

import logging

import torch

from ..errors import ConfigError, DataError
from .embed import complete_samples, embed_shards
from .nway import nway_scores
from .retrieval import bidirectional_retrieval, retrieval_metrics
from .zeroshot import classification_metrics, read_lines, read_templates, zeroshot_classifier

log = logging.getLogger(__name__)


def default_query(model, text: str = "text") -> str:
    for name, m in model.modalities.items():
        if m.kind != "text" and name != text:
            return name
    raise ConfigError("no non-text modality to evaluate; pass the query modality")


def query_modalities(model, query: str | list[str] | None, other: str) -> list[str]:
    """``"image,audio"`` (or a list) -> ["image", "audio"]; None -> the default single query; names checked."""
    if query is None:
        names = [default_query(model, other)]
    else:
        names = [q.strip() for q in query.split(",")] if isinstance(query, str) else list(query)
    for name in names + [other]:
        if name not in model.modalities:
            raise ConfigError(f"model has no modality {name!r}; it has {', '.join(model.modalities)}")
    if len(set(names)) != len(names) or other in names:
        raise ConfigError(f"query modalities {names} must be distinct and differ from {other!r}")
    return names


def model_score(model, score: str | None) -> str:
    """The N-way score to use: the one asked for, else the one the model was trained with, else ``cosine``."""
    return score or model.config.nway_score or "cosine"


def abbrev(query: list[str], gallery: str) -> str:
    """``image``/``text`` -> ``i2t``, as in the CLIP literature; ``image,audio``/``text`` -> ``ia2t``."""
    return f"{''.join(q[0] for q in query)}2{gallery[0]}"


def evaluate_zeroshot(model, data: str, classes: str, templates: str | None = None, query: str | None = None,
                      text: str = "text", batch_size: int = 256, num_workers: int = 0,
                      score: str | None = None) -> dict:
    """Zero-shot accuracy of ``query`` samples in ``data`` against class-name prompts; samples carry ``label.txt``.

    With several query modalities the classes are scored against each sample's tuple (N-way zero-shot).
    """
    queries = query_modalities(model, query, text)
    classnames = read_lines(classes, "classes")
    index = {c: i for i, c in enumerate(classnames)}
    emb = complete_samples(embed_shards(model, data, queries, batch_size, num_workers), queries)
    labels = emb["labels"]
    if not labels:
        raise DataError(f"{data}: no usable samples to evaluate (with all of {', '.join(queries)} present)")
    unknown = sorted({str(lab) for lab in labels if lab not in index})
    if unknown:
        raise DataError(
            f"{data}: sample labels not in {classes}: {', '.join(unknown[:5])}"
            + (" ..." if len(unknown) > 5 else "") + " (each sample needs a label.txt naming one of the classes)"
        )
    classifier = zeroshot_classifier(model, classnames, read_templates(templates), text, batch_size).cpu()
    target = torch.tensor([index[lab] for lab in labels])
    if len(queries) == 1:
        logits = emb["embeddings"][queries[0]] @ classifier
    else:
        logits = nway_scores({q: emb["embeddings"][q] for q in queries}, classifier.T, model_score(model, score))
    k = min(5, len(classnames))
    acc = classification_metrics(logits, target, topk=(1, k))
    predictions = torch.tensor(acc["predictions"])
    per_class = {c: (predictions[target == i] == i).float().mean().item() if (target == i).any() else 0.0
                 for c, i in index.items()}
    out = {
        "zeroshot_top1": acc["acc1"],
        f"zeroshot_top{k}": acc[f"acc{k}"],
        "zeroshot_mean_per_class_recall": acc["mean_per_class_recall"],
        "zeroshot_n": len(labels),
        "_per_class": per_class,
        "_confusion": (target.tolist(), acc["predictions"], classnames),
        "_skipped": emb["skipped"],
    }
    if len(queries) > 1:
        out["zeroshot_score"] = model_score(model, score)
    return out


def evaluate_retrieval(model, data: str, query: str | None = None, gallery: str = "text", batch_size: int = 256,
                       num_workers: int = 0, score: str | None = None) -> dict:
    """Retrieval query->gallery and back (R@1/5/10, mAP, mAP@10), several gallery items per sample allowed.

    With several query modalities: N-way retrieval of the gallery items from each sample's tuple (one direction).
    """
    queries = query_modalities(model, query, gallery)
    names = queries + [gallery]
    emb = complete_samples(embed_shards(model, data, names, batch_size, num_workers), names)
    g, owner = emb["embeddings"][gallery], emb["owners"][gallery]
    n = len(emb["keys"])
    if n == 0:
        raise DataError(f"{data}: no usable samples to evaluate (with all of {', '.join(names)} present)")
    if len(queries) == 1:
        q = emb["embeddings"][queries[0]]
        metrics = bidirectional_retrieval(q, g, owner, queries[0][0], gallery[0])
        similarity = q[:32] @ g[:64].T
    else:
        method = model_score(model, score)
        tuples = torch.stack([emb["embeddings"][m] for m in queries], dim=1)  # N x K x D

        def scores(rows: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
            return nway_scores(dict(zip(queries, rows.unbind(1))), items, method)

        owner = owner if owner is not None else torch.arange(g.shape[0])
        positives = [[] for _ in range(n)]
        for j, i in enumerate(owner.tolist()):
            positives[i].append(j)
        found = retrieval_metrics(tuples, g, positives, map_at=10, similarity=scores)
        metrics = {f"{abbrev(queries, gallery)}_{k}": v for k, v in found.items()}
        metrics["score"] = method
        similarity = scores(tuples[:32], g[:64])
    out = {f"retrieval_{k}": v for k, v in metrics.items()}
    out["retrieval_n"] = n
    out["_similarity"] = similarity
    out["_skipped"] = emb["skipped"]
    return out
