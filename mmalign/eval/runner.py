"""Evaluation entry points shared by ``mmalign eval`` and the end of training: shards in, headline numbers out.

A query is one modality, or several ("image,audio"): an N-way query scores each candidate (a class prompt, a
gallery item) against the tuple of its given modalities with the model's N-way score (``mmalign.eval.nway``:
``mip`` for Symile, ``volume`` for GRAM, ``cosine`` = sum of cosines for pairwise objectives). Only samples that
carry every modality involved are evaluated.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from ..config import GenerationConfig
from ..data import expand_urls
from ..data.pipeline import ShardReader, SkipSample, SkipStats, decode_label, find_member, shard_labels
from ..errors import ConfigError, DataError
from ..io import atomic_write_text
from ..modalities import Modality, inputs_to
from ..modalities.text import TextModality, parse_captions
from .captioning import caption_exact_match, caption_metrics
from .diagnostics import embedding_diagnostics
from .embed import complete_samples, embed_shards
from .linear_probe import linear_probe
from .nway import nway_scores
from .retrieval import bidirectional_retrieval, positives_by_group, retrieval_metrics, row_samples, shared_items
from .zeroshot import check_labels, classification_metrics, read_classes, read_templates, zeroshot_classifier

log = logging.getLogger(__name__)

HEADLINE_KS = (1, 5, 10)
CURVE_KS = (1, 2, 3, 5, 10, 20, 50, 100)  # recall@k curve in the report


def recall_ks(n_items: int) -> tuple[int, ...]:
    """The k of R@k to compute: the headline ones, and the report's curve points up to the gallery size."""
    return tuple(sorted(set(HEADLINE_KS) | {k for k in CURVE_KS if k <= n_items}))


def headline(metric: str) -> bool:
    """Whether a retrieval metric (``R@k`` or ``<direction>_R@k``, ``mAP``, ...) goes into the results: every one
    but the curve-only R@k."""
    return "R@" not in metric or int(metric.rsplit("@", 1)[1]) in HEADLINE_KS


def merge_results(results: dict, new: dict) -> dict:
    """``results.update(new)``, merging the ``clip_benchmark`` sub-objects instead of replacing one by the other."""
    for key, value in new.items():
        if key == "clip_benchmark" and key in results:
            results[key] = {**results[key], **value}
        else:
            results[key] = value
    return results


def flat_results(results: dict, prefix: str = "") -> dict:
    """Nested result objects (``clip_benchmark``) as dotted keys."""
    flat = {}
    for k, v in results.items():
        if isinstance(v, dict):
            flat.update(flat_results(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


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


def abbrev(query: str | list[str], gallery: str) -> str:
    """``image``/``text`` -> ``i2t``, as in the CLIP literature; ``[image, audio]``/``text`` -> ``ia2t``."""
    return f"{''.join(q[0] for q in ([query] if isinstance(query, str) else query))}2{gallery[0]}"


def evaluate_zeroshot(model, data: str, classes: str, templates: str | None = None, query: str | None = None,
                      text: str = "text", batch_size: int = 256, num_workers: int | None = 0,
                      score: str | None = None) -> dict:
    """Zero-shot accuracy of ``query`` samples in ``data`` against class prompts; samples carry ``label.txt``.
    ``zeroshot_samples_per_s``: samples decoded and embedded per second (``num_workers`` None: one worker per shard,
    see :func:`~mmalign.eval.embed.eval_workers`).

    ``classes``: a classes file (:func:`~.zeroshot.read_classes`: names, or names with prompts of their own); the
    shard labels are checked against it before anything is encoded. With several query modalities the classes are
    scored against each sample's tuple (N-way zero-shot). Returns top-1/top-5, mean per-class recall, the recall of
    each class (None for a class without samples) and the confusion matrix (rows: true class, columns: predicted).
    """
    queries = query_modalities(model, query, text)
    prompts = read_classes(classes)
    classnames = list(prompts)
    check_labels(data, classnames, classes)
    index = {c: i for i, c in enumerate(classnames)}
    emb = complete_samples(embed_shards(model, data, queries, batch_size, num_workers), queries)
    labels = emb["labels"]
    if not labels:
        raise DataError(f"{data}: no usable samples to evaluate (with all of {', '.join(queries)} present)")
    classifier = zeroshot_classifier(model, classnames, read_templates(templates), text, batch_size, prompts).cpu()
    target = torch.tensor([index[lab] for lab in labels])
    if len(queries) == 1:
        logits = emb["embeddings"][queries[0]] @ classifier
    else:
        logits = nway_scores({q: emb["embeddings"][q] for q in queries}, classifier.T, model_score(model, score))
    k5 = min(5, len(classnames))
    acc = classification_metrics(logits, target, topk=(1, k5))
    confusion = torch.zeros(len(classnames), len(classnames), dtype=torch.long)
    confusion.index_put_((target, torch.tensor(acc["predictions"])), torch.tensor(1), accumulate=True)
    out = {
        "zeroshot_top1": acc["acc1"],
        f"zeroshot_top{k5}": acc[f"acc{k5}"],
        "zeroshot_mean_per_class_recall": acc["mean_per_class_recall"],
        "zeroshot_n": len(labels),
        "zeroshot_per_class_recall": {c: acc["per_class_recall"].get(i) for c, i in index.items()},
        "zeroshot_confusion": {"classes": classnames, "matrix": confusion.tolist()},
        # CLIP_benchmark's keys (acc5 is top-min(5, classes), as every class is within the top 5 of fewer classes)
        "clip_benchmark": {"acc1": acc["acc1"], "acc5": acc[f"acc{k5}"],
                           "mean_per_class_recall": acc["mean_per_class_recall"]},
        "skipped": emb["skipped"].get("counts", {}),
        "zeroshot_samples_per_s": round(emb["samples_per_s"], 1),
    }
    if len(queries) > 1:
        out["zeroshot_score"] = model_score(model, score)
    return out


def evaluate_linear_probe(model, train_data: str, data: str, query: str | None = None, batch_size: int = 256,
                          num_workers: int | None = 0) -> dict:
    """Linear probe: logistic regression on the frozen ``query`` embeddings of ``train_data`` (its L2 strength chosen
    on a held-out fifth), scored on ``data`` (:mod:`~.linear_probe`). Classes are the training labels; every sample
    needs a ``label.txt``, and the labels are checked before anything is encoded."""
    query = query or default_query(model)
    if query not in model.modalities:
        raise ConfigError(f"model has no modality {query!r} (a linear probe reads one modality's embeddings); it has "
                          f"{', '.join(model.modalities)}")
    queries = [query]
    counts = shard_labels(expand_urls(train_data))
    if counts.get(None):
        raise DataError(f"{train_data}: {counts[None]} sample(s) have no label.txt (each needs one naming its class)")
    classnames = sorted(counts)
    if len(classnames) < 2:
        raise DataError(f"{train_data}: a linear probe needs at least 2 classes, the labels name {len(classnames)}")
    check_labels(data, classnames, f"the training labels of {train_data}")
    index = {c: i for i, c in enumerate(classnames)}
    sets = {}
    for name, spec in (("train", train_data), ("test", data)):
        emb = complete_samples(embed_shards(model, spec, queries, batch_size, num_workers), queries)
        if not emb["keys"]:
            raise DataError(f"{spec}: no usable samples (with {queries[0]} present)")
        sets[name] = (emb["embeddings"][queries[0]], torch.tensor([index[lab] for lab in emb["labels"]]),
                      emb["skipped"].get("counts", {}))
    logits, weight_decay = linear_probe(sets["train"][0], sets["train"][1], sets["test"][0], len(classnames))
    k5 = min(5, len(classnames))
    acc = classification_metrics(logits, sets["test"][1], topk=(1, k5))
    return {
        "linear_probe_top1": acc["acc1"],
        f"linear_probe_top{k5}": acc[f"acc{k5}"],
        "linear_probe_mean_per_class_recall": acc["mean_per_class_recall"],
        "linear_probe_per_class_recall": {c: acc["per_class_recall"].get(i) for c, i in index.items()},
        "linear_probe_n": len(sets["test"][1]),
        "linear_probe_n_train": len(sets["train"][1]),
        "linear_probe_weight_decay": weight_decay,
        "linear_probe_query": queries[0],
        "skipped": {"train": sets["train"][2], "test": sets["test"][2]},
    }


POSITIVES = ("sample", "label")  # what counts as a correct retrieval: the query's own sample's items, or its class's


def evaluate_retrieval(model, data: str, query: str | None = None, gallery: str = "text", batch_size: int = 256,
                       num_workers: int | None = 0, score: str | None = None, positives: str = "sample") -> dict:
    """Retrieval query->gallery and back (R@1/5/10, mAP, mAP@10), several items per sample on either side allowed.

    ``positives``: ``sample`` (the items of the query's own sample are correct) or ``label`` (every item whose
    sample has the query's ``label.txt``). With ``sample``, items equal to one of another sample (a caption several
    samples carry) are counted and warned about: retrieval cannot tell such samples apart (``retrieval_distinct_*``).
    With a text gallery (or text queries) the result also carries CLIP_benchmark's keys under ``clip_benchmark``:
    ``text_retrieval_recall@k`` (each non-text item retrieves its texts) and ``image_retrieval_recall@k`` (each text
    retrieves its item; named "image" as in CLIP_benchmark whatever the non-text modality). ``_retrieval`` (the
    embeddings, sample keys and owners) and ``_recall_curve`` are for the report. With several query modalities:
    N-way retrieval of the gallery items from each sample's tuple (that direction only; see ``nway_retrieval``).
    """
    if positives not in POSITIVES:
        raise ConfigError(f"positives must be {' or '.join(POSITIVES)}, got {positives!r}")
    queries = query_modalities(model, query, gallery)
    names = queries + [gallery]
    emb = complete_samples(embed_shards(model, data, names, batch_size, num_workers), names)
    if not emb["keys"]:
        raise DataError(f"{data}: no usable samples to evaluate (with all of {', '.join(names)} present)")
    if len(queries) > 1:
        return {**nway_retrieval(emb, queries, gallery, model_score(model, score)),
                "retrieval_samples_per_s": round(emb["samples_per_s"], 1)}
    query = queries[0]
    q, g = emb["embeddings"][query], emb["embeddings"][gallery]
    samples = {name: row_samples(emb["owners"][name], emb["embeddings"][name].shape[0]) for name in names}
    groups = samples if positives == "sample" else label_groups(emb["labels"], samples, data)
    ks = recall_ks(max(g.shape[0], q.shape[0]))
    metrics = bidirectional_retrieval(q, g, groups[gallery], query[0], gallery[0], ks=ks, a_owner=groups[query])
    directions = (f"{query[0]}2{gallery[0]}", f"{gallery[0]}2{query[0]}")
    out = {f"retrieval_{k}": v for k, v in metrics.items() if headline(k)}
    out["retrieval_n"] = len(emb["keys"])
    out["retrieval_positives"] = positives
    if positives == "sample":
        out.update(warn_about_shared_items(emb, names, samples))
    out["retrieval_samples_per_s"] = round(emb["samples_per_s"], 1)
    kinds = (model.modalities[query].kind, model.modalities[gallery].kind)
    if "text" in kinds and kinds[0] != kinds[1]:
        to_text, to_other = directions if kinds[1] == "text" else directions[::-1]
        out["clip_benchmark"] = {
            **{f"image_retrieval_recall@{k}": metrics[f"{to_other}_R@{k}"] for k in HEADLINE_KS},
            **{f"text_retrieval_recall@{k}": metrics[f"{to_text}_R@{k}"] for k in HEADLINE_KS},
        }
    out["_recall_curve"] = {d: {k: metrics[f"{d}_R@{k}"] for k in ks} for d in directions}
    out["_retrieval"] = {"data": data, "query": query, "gallery": gallery, "query_embeddings": q,
                         "gallery_embeddings": g, "query_groups": groups[query], "gallery_groups": groups[gallery],
                         "query_samples": samples[query], "gallery_samples": samples[gallery], "keys": emb["keys"]}
    out["_similarity"] = (q[:32] @ g[:64].T)
    out["skipped"] = emb["skipped"].get("counts", {})
    return out


def label_groups(labels: list, samples: dict[str, torch.Tensor], data: str) -> dict[str, torch.Tensor]:
    """Each row's class (an index into the distinct labels), for ``positives: label``."""
    unlabelled = sum(label is None for label in labels)
    if unlabelled:
        raise DataError(f"{data}: {unlabelled} of {len(labels)} samples have no label.txt; --positives label "
                        f"counts same-label items as positives, so every sample needs one")
    index = {label: i for i, label in enumerate(sorted(set(labels)))}
    sample_class = torch.tensor([index[label] for label in labels])
    return {name: sample_class[rows] for name, rows in samples.items()}


def warn_about_shared_items(emb: dict, names: list[str], samples: dict[str, torch.Tensor]) -> dict:
    """``retrieval_distinct_<name>``: how many distinct embeddings a modality's items have, where several samples
    share one (a repeated caption, or inputs the model maps to one point), with a warning: a query then finds the
    other samples' equal items as high as its own, and those count as wrong."""
    out = {}
    for name in names:
        distinct, shared = shared_items(emb["embeddings"][name], samples[name])
        if shared:
            out[f"retrieval_distinct_{name}"] = distinct
            log.warning("retrieval: the %d %s items have only %d distinct embeddings (repeated items, or inputs the "
                        "model maps to one point); %d items share theirs with other samples, and retrieval cannot "
                        "tell those apart: an equal item of another sample counts as wrong, so R@k is low by "
                        "construction. --positives label counts same-label items as positives",
                        len(samples[name]), name, distinct, shared)
    return out


def nway_retrieval(emb: dict, queries: list[str], gallery: str, method: str) -> dict:
    """Each sample's tuple of ``queries`` embeddings ranks all ``gallery`` items by ``method`` (its own are the
    positives): R@k, mAP, mAP@10 under ``retrieval_<abbrev>_``, the recall curve and similarity for the report."""
    g, owner = emb["embeddings"][gallery], emb["owners"][gallery]
    tuples = torch.stack([emb["embeddings"][m] for m in queries], dim=1)  # N x K x D

    def scores(rows: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return nway_scores(dict(zip(queries, rows.unbind(1))), items, method)

    ks = recall_ks(g.shape[0])
    positives = positives_by_group(torch.arange(tuples.shape[0]), row_samples(owner, g.shape[0]))
    metrics = retrieval_metrics(tuples, g, positives, ks=ks, map_at=10, similarity=scores)
    direction = abbrev(queries, gallery)
    out = {f"retrieval_{direction}_{k}": v for k, v in metrics.items() if headline(k)}
    out["retrieval_score"] = method
    out["retrieval_n"] = tuples.shape[0]
    out["_recall_curve"] = {direction: {k: metrics[f"R@{k}"] for k in ks}}
    out["_similarity"] = scores(tuples[:32], g[:64])
    out["skipped"] = emb["skipped"].get("counts", {})
    return out


def evaluate_diagnostics(model, data: str, batch_size: int = 256, max_samples: int = 500, num_workers: int = 0) -> dict:
    """Embedding-space diagnostics (modality gap, alignment, uniformity) of the first ``max_samples`` samples of
    ``data``: one row per sample and modality (the first caption where a sample has several)."""
    names = list(model.modalities)
    emb = complete_samples(embed_shards(model, data, names, batch_size, num_workers, max_samples), names)
    if not emb["keys"]:
        raise DataError(f"{data}: no sample with all of {', '.join(model.modalities)} for the embedding diagnostics")
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


SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def caption_items(data: str, name: str, modality: Modality, text: str,
                  stats: SkipStats) -> Iterator[tuple[str, Any, list[str] | None, str | None]]:
    """(key, item ready to collate, reference captions or None, label or None) for each item to caption.

    ``data``: shards (their ``name`` member is captioned; the ``text`` member gives references, ``label.txt`` the
    class word), or files of the captioned modality: a folder (searched recursively), a glob, paths separated by
    ``::``. Unusable samples are skipped and counted in ``stats``; a file of another kind is an error.
    """
    extensions = (*modality.extensions, *modality.file_extensions)
    if os.path.isdir(data):
        paths = sorted(str(f) for f in Path(data).rglob("*") if f.suffix.lower().lstrip(".") in extensions)
        if not paths:
            raise DataError(f"{data}: no {'/'.join(extensions)} files to caption")
    else:
        paths = expand_urls(data)
    if all(u.endswith(SHARD_SUFFIXES) for u in paths):
        samples = ShardReader(stats)({"url": u} for u in paths)
    else:
        for path in paths:
            if Path(path).suffix.lower().lstrip(".") not in extensions:
                raise DataError(f"{path}: cannot caption a {Path(path).suffix or 'suffix-less'} file "
                                f"({name} files are {', '.join(extensions)})")
        samples = ({"__key__": path, "__url__": path, **modality.file_members(Path(path))} for path in paths)
    for sample in samples:
        key = sample["__key__"]
        where = f"{sample.get('__url__', '?')}:{key}"
        member = find_member(sample, name, modality.extensions)
        if member is None:
            stats.add(f"missing {name}", where)
            continue
        text_member = find_member(sample, text, TextModality.extensions)
        try:
            item = modality.transform(modality.decode_member(sample, member), train=False)
        except DataError as e:
            stats.add(f"bad {name}", f"{where}: {member}: {e}")
            continue
        try:
            refs = parse_captions(sample[text_member], text_member.rsplit(".", 1)[-1]) if text_member else None
        except DataError as e:
            stats.add(f"bad {text}", f"{where}: {text_member}: {e}")
            continue
        try:
            label = decode_label(sample, where)
        except SkipSample as e:
            stats.add(e.reason, e.where)
            continue
        yield key, item, refs, label


def evaluate_captions(model, data: str, out: str | Path, generation: GenerationConfig | None = None,
                      batch_size: int = 256) -> dict:
    """Caption every item of ``data`` (see ``caption_items``) with a CoCa model, write ``out`` as JSONL, score.

    Each JSONL row holds ``key`` and ``caption``, plus ``references`` and ``label`` where the data has them.
    Returns ``caption_n``, ``captions`` (the path), the COCO caption metrics of :func:`caption_metrics` over the
    items with references (``caption_BLEU-1..4``, ``caption_CIDEr``, ``caption_ROUGE-L``, ``caption_METEOR`` where
    Java runs, and ``caption_tokenizer``, which tokenizer produced them), and ``caption_exact_match`` (the class
    word appears in the caption) over those with labels.
    """
    cap = model.config.caption
    if cap is None:
        raise ConfigError("this model has no caption decoder (model.caption is not set)")
    gen = generation or GenerationConfig()
    modality = model.modalities[cap.context]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(gen.seed)
    model.eval()
    stats = SkipStats()
    rows: list[dict[str, Any]] = []
    batch: list[tuple] = []

    def flush() -> None:
        inputs = inputs_to(modality.collate([item for item, _ in batch]), device)
        for (_, row), caption in zip(batch, model.generate_captions(inputs, gen, generator)):
            rows.append({"key": row["key"], "caption": caption, **{k: v for k, v in row.items() if k != "key"}})
        batch.clear()

    for key, item, refs, label in tqdm(caption_items(data, cap.context, modality, cap.text, stats),
                                       desc="caption", unit="item", leave=False):
        row = {"key": key}
        row.update({k: v for k, v in (("references", refs), ("label", label)) if v is not None})
        batch.append((item, row))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not rows:
        raise DataError(f"{data}: nothing to caption (skipped: {dict(stats.counts)})")
    out = Path(out)
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    result: dict[str, Any] = {"caption_n": len(rows), "captions": str(out)}
    scored = [r for r in rows if "references" in r]
    if scored:
        metrics = caption_metrics([r["caption"] for r in scored], [r["references"] for r in scored])
        result.update({f"caption_{k}": v for k, v in metrics.items()})
    labelled = [r for r in rows if "label" in r]
    if labelled:
        result["caption_exact_match"] = caption_exact_match([r["caption"] for r in labelled],
                                                            [r["label"] for r in labelled])
    result["skipped"] = dict(stats.counts)
    result["_examples"] = rows[:8]
    return result
