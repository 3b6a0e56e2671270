"""Evaluation entry points shared by ``mmalign eval`` and the end of training: shards in, headline numbers out."""
from __future__ import annotations

import logging

import torch

from ..errors import ConfigError, DataError
from .embed import embed_shards
from .retrieval import bidirectional_retrieval
from .zeroshot import read_lines, read_templates, zeroshot_accuracy, zeroshot_classifier

log = logging.getLogger(__name__)

HEADLINE_KS = (1, 5, 10)
CURVE_KS = (1, 2, 3, 5, 10, 20, 50, 100)  # recall@k curve in the report


def merge_results(results: dict, new: dict) -> dict:
    """``results.update(new)``, merging the ``clip_benchmark`` sub-objects instead of replacing one by the other."""
    for key, value in new.items():
        if key == "clip_benchmark" and key in results:
            results[key] = {**results[key], **value}
        else:
            results[key] = value
    return results


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
    k5 = min(5, len(classnames))
    per_class = {c: 0.0 for c in classnames}
    for c, i in index.items():
        mask = target == i
        if mask.any():
            per_class[c] = (torch.tensor(acc["predictions"])[mask] == i).float().mean().item()
    return {
        "zeroshot_top1": acc["acc1"],
        f"zeroshot_top{k5}": acc[f"acc{k5}"],
        "zeroshot_mean_per_class_recall": acc["mean_per_class_recall"],
        "zeroshot_n": len(labels),
        # CLIP_benchmark's keys (acc5 is top-min(5, classes), as every class is within the top 5 of fewer classes)
        "clip_benchmark": {"acc1": acc["acc1"], "acc5": acc[f"acc{k5}"],
                           "mean_per_class_recall": acc["mean_per_class_recall"]},
        "_per_class": per_class,
        "_confusion": (target.tolist(), acc["predictions"], classnames),
        "skipped": emb["skipped"].get("counts", {}),
    }


def evaluate_retrieval(model, data: str, query: str | None = None, gallery: str = "text", batch_size: int = 256,
                       num_workers: int = 0) -> dict:
    """Retrieval query->gallery and back (R@1/5/10, mAP, mAP@10), several gallery items per sample allowed.

    With a text gallery (or text queries) the result also carries CLIP_benchmark's keys under ``clip_benchmark``:
    ``text_retrieval_recall@k`` (each non-text item retrieves its texts) and ``image_retrieval_recall@k`` (each text
    retrieves its item; named "image" as in CLIP_benchmark whatever the non-text modality). ``_retrieval`` (the
    embeddings, sample keys and owners) and ``_recall_curve`` are for the report.
    """
    query = query or default_query(model, gallery)
    for name in (query, gallery):
        if name not in model.modalities:
            raise ConfigError(f"model has no modality {name!r}; it has {', '.join(model.modalities)}")
    emb = embed_shards(model, data, [query, gallery], batch_size, num_workers)
    q, g = emb["embeddings"][query], emb["embeddings"][gallery]
    if q.shape[0] == 0:
        raise DataError(f"{data}: no usable samples to evaluate")
    ks = tuple(sorted(set(HEADLINE_KS) | {k for k in CURVE_KS if k <= max(g.shape[0], q.shape[0])}))
    metrics = bidirectional_retrieval(q, g, emb["owners"][gallery], query[0], gallery[0], ks=ks)
    directions = (f"{query[0]}2{gallery[0]}", f"{gallery[0]}2{query[0]}")
    out = {f"retrieval_{k}": v for k, v in metrics.items() if "_R@" not in k or int(k.rsplit("@", 1)[1]) in HEADLINE_KS}
    out["retrieval_n"] = q.shape[0]
    kinds = (model.modalities[query].kind, model.modalities[gallery].kind)
    if "text" in kinds and kinds[0] != kinds[1]:
        to_text, to_other = directions if kinds[1] == "text" else directions[::-1]
        out["clip_benchmark"] = {
            **{f"image_retrieval_recall@{k}": metrics[f"{to_other}_R@{k}"] for k in HEADLINE_KS},
            **{f"text_retrieval_recall@{k}": metrics[f"{to_text}_R@{k}"] for k in HEADLINE_KS},
        }
    out["_recall_curve"] = {d: {k: metrics[f"{d}_R@{k}"] for k in ks} for d in directions}
    out["_retrieval"] = {"data": data, "query": query, "gallery": gallery, "query_embeddings": q,
                         "gallery_embeddings": g, "owners": emb["owners"][gallery], "keys": emb["keys"]}
    out["_similarity"] = (q[:32] @ g[:64].T)
    out["skipped"] = emb["skipped"].get("counts", {})
    return out
