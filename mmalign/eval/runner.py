"""Evaluation entry points shared by ``mmalign eval`` and the end of training: shards in, headline numbers out."""
from __future__ import annotations

import logging

import torch

from ..errors import ConfigError, DataError
from .diagnostics import embedding_diagnostics
from .embed import embed_shards
from .retrieval import bidirectional_retrieval
from .zeroshot import read_lines, read_templates, zeroshot_accuracy, zeroshot_classifier

log = logging.getLogger(__name__)


def default_query(model, text: str = "text") -> str:
    for name, m in model.modalities.items():
        if m.kind != "text" and name != text:
            return name
    raise ConfigError("no non-text modality to evaluate; pass the query modality")


def abbrev(query: str, gallery: str) -> str:
    """``image``/``text`` -> ``i2t``, as in the CLIP literature."""
    return f"{query[0]}2{gallery[0]}"


def evaluate_zeroshot(model, data: str, classes: str, templates: str | None = None, query: str | None = None,
                      text: str = "text", batch_size: int = 256, num_workers: int = 0) -> dict:
    """Zero-shot accuracy of ``query`` samples in ``data`` against class-name prompts; samples carry ``label.txt``."""
    query = query or default_query(model, text)
    classnames = read_lines(classes, "classes")
    index = {c: i for i, c in enumerate(classnames)}
    emb = embed_shards(model, data, [query], batch_size, num_workers)
    labels = emb["labels"]
    if not labels:
        raise DataError(f"{data}: no usable samples to evaluate")
    unknown = sorted({str(lab) for lab in labels if lab not in index})
    if unknown:
        raise DataError(
            f"{data}: sample labels not in {classes}: {', '.join(unknown[:5])}"
            + (" ..." if len(unknown) > 5 else "") + " (each sample needs a label.txt naming one of the classes)"
        )
    classifier = zeroshot_classifier(model, classnames, read_templates(templates), text, batch_size)
    target = torch.tensor([index[lab] for lab in labels])
    acc = zeroshot_accuracy(emb["embeddings"][query], classifier.cpu(), target, topk=(1, min(5, len(classnames))))
    per_class = {c: 0.0 for c in classnames}
    for c, i in index.items():
        mask = target == i
        if mask.any():
            per_class[c] = (torch.tensor(acc["predictions"])[mask] == i).float().mean().item()
    return {
        "zeroshot_top1": acc["acc1"],
        f"zeroshot_top{min(5, len(classnames))}": acc[f"acc{min(5, len(classnames))}"],
        "zeroshot_mean_per_class_recall": acc["mean_per_class_recall"],
        "zeroshot_n": len(labels),
        "_per_class": per_class,
        "_confusion": (target.tolist(), acc["predictions"], classnames),
        "_skipped": emb["skipped"],
    }


def evaluate_retrieval(model, data: str, query: str | None = None, gallery: str = "text", batch_size: int = 256,
                       num_workers: int = 0) -> dict:
    """Retrieval query->gallery and back (R@1/5/10, mAP, mAP@10), several gallery items per sample allowed."""
    query = query or default_query(model, gallery)
    for name in (query, gallery):
        if name not in model.modalities:
            raise ConfigError(f"model has no modality {name!r}; it has {', '.join(model.modalities)}")
    emb = embed_shards(model, data, [query, gallery], batch_size, num_workers)
    q, g = emb["embeddings"][query], emb["embeddings"][gallery]
    if q.shape[0] == 0:
        raise DataError(f"{data}: no usable samples to evaluate")
    metrics = bidirectional_retrieval(q, g, emb["owners"][gallery], query[0], gallery[0])
    out = {f"retrieval_{k}": v for k, v in metrics.items()}
    out["retrieval_n"] = q.shape[0]
    out["_similarity"] = (q[:32] @ g[:64].T)
    out["_skipped"] = emb["skipped"]
    return out


def evaluate_diagnostics(model, data: str, batch_size: int = 256, max_samples: int = 500, num_workers: int = 0) -> dict:
    """Embedding-space diagnostics (modality gap, alignment, uniformity) of the first ``max_samples`` samples of
    ``data``: one row per sample and modality (the first caption where a sample has several)."""
    emb = embed_shards(model, data, list(model.modalities), batch_size, num_workers, max_samples)
    if not emb["keys"]:
        raise DataError(f"{data}: no usable samples for the embedding diagnostics")
    paired = {}
    for name, x in emb["embeddings"].items():
        owners = emb["owners"][name]
        if owners is not None:
            first = torch.ones_like(owners, dtype=torch.bool)
            first[1:] = owners[1:] != owners[:-1]
            x = x[first]
        paired[name] = x[:max_samples]
    out: dict = embedding_diagnostics(paired)
    out["diagnostics_n"] = next(iter(paired.values())).shape[0]
    out["_embeddings"] = paired
    return out
