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

from ..config import RETRIEVAL_MATCHES, GenerationConfig
from ..data import expand_urls
from ..data.pipeline import ShardReader, SkipSample, SkipStats, decode_label, find_member, shard_labels
from ..errors import ConfigError, DataError
from ..io import atomic_write_text
from ..modalities import Modality, inputs_to
from ..modalities.text import TextModality, parse_captions
from .candidates import read_candidates
from .captioning import caption_exact_match, caption_metrics
from .diagnostics import embedding_diagnostics
from .embed import complete_samples, embed_shards
from .linear_probe import linear_probe
from .nway import nway_scores
from .protocols import Side, candidate_sets, make_side, matching_rescore, rank, score_function
from .retrieval import restrict_to, row_groups, shared_items
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


def modality_names(names: str | list[str]) -> list[str]:
    """``"image,audio"`` (or a list) -> ["image", "audio"]."""
    return [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)


def query_modalities(model, query: str | list[str] | None, other: str | list[str]) -> list[str]:
    """``"image,audio"`` (or a list) -> ["image", "audio"]; None -> the default single query; names checked against
    the model's and against ``other`` (the modality, or modalities, on the other side)."""
    others = modality_names(other)
    names = [default_query(model, others[0])] if query is None else modality_names(query)
    for name in names + others:
        if name not in model.modalities:
            raise ConfigError(f"model has no modality {name!r}; it has {', '.join(model.modalities)}")
    if len(set(names + others)) != len(names + others):
        raise ConfigError(f"query modalities {names} must be distinct and differ from {', '.join(others)}")
    return names


def model_score(model, score: str | None) -> str:
    """The N-way score to use: the one asked for, else the one the model was trained with, else ``cosine``."""
    return score or model.config.nway_score or "cosine"


def abbrev(query: str | list[str], gallery: str | list[str]) -> str:
    """``image``/``text`` -> ``i2t``, as in the CLIP literature; ``[image, audio]``/``text`` -> ``ia2t``,
    ``text``/``[image, audio]`` -> ``t2ia``."""
    return f"{''.join(q[0] for q in modality_names(query))}2{''.join(g[0] for g in modality_names(gallery))}"


def evaluate_zeroshot(model, data: str, classes: str, templates: str | None = None, query: str | None = None,
                      text: str = "text", batch_size: int = 256, num_workers: int | None = 0,
                      score: str | None = None, candidates: str | None = None) -> dict:
    """Zero-shot accuracy of ``query`` samples in ``data`` against class prompts; samples carry ``label.txt``.
    ``zeroshot_samples_per_s``: samples decoded and embedded per second (``num_workers`` None: one worker per shard,
    see :func:`~mmalign.eval.embed.eval_workers`).

    ``classes``: a classes file (:func:`~.zeroshot.read_classes`: names, or names with prompts of their own); the
    shard labels are checked against it before anything is encoded. With several query modalities the classes are
    scored against each sample's tuple (N-way zero-shot). With ``candidates`` (a file, :mod:`.candidates`) only the
    samples it lists are classified, each among its own classes. Returns top-1/top-5, mean per-class recall, the
    recall of each class (None for a class without samples) and the confusion matrix (rows: true class, columns:
    predicted).
    """
    queries = query_modalities(model, query, text)
    prompts = read_classes(classes)
    classnames = list(prompts)
    index = {c: i for i, c in enumerate(classnames)}
    emb = complete_samples(embed_shards(model, data, queries, batch_size, num_workers,
                                        before_encoding=lambda: check_labels(data, classnames, classes)), queries)
    labels = emb["labels"]
    if not labels:
        raise DataError(f"{data}: no usable samples to evaluate (with all of {', '.join(queries)} present)")
    classifier = zeroshot_classifier(model, classnames, read_templates(templates), text, batch_size, prompts).cpu()
    target = torch.tensor([index[lab] for lab in labels])
    if len(queries) == 1:
        logits = emb["embeddings"][queries[0]] @ classifier
    else:
        logits = nway_scores({q: emb["embeddings"][q] for q in queries}, classifier.T, model_score(model, score))
    if candidates is not None:
        logits, target, labels = class_candidates(candidates, classes, emb["keys"], logits, target, classnames)
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
    if candidates is not None:
        out["zeroshot_candidates"] = str(candidates)
    return out


def class_candidates(path: str, classes: str, keys: list[str], logits: torch.Tensor, target: torch.Tensor,
                     classnames: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(logits, targets, labels) of the samples the candidates file lists, each row's other classes at -inf."""
    listed = read_candidates(path, classnames, f"a class of {classes}")
    row = {key: i for i, key in enumerate(keys)}
    absent = [key for key in listed if key not in row]
    if absent:
        raise DataError(f"{path}: query {absent[0]!r} is not a sample of the data with every evaluated modality")
    index = {c: i for i, c in enumerate(classnames)}
    rows = torch.tensor([row[key] for key in listed])
    allowed = [torch.tensor([index[c] for c in classes_of]) for classes_of in listed.values()]
    for key, r, columns in zip(listed, rows.tolist(), allowed):
        if int(target[r]) not in columns.tolist():
            raise DataError(f"{path}: the candidates of {key!r} lack its label {classnames[int(target[r])]!r}")
    return restrict_to(logits[rows], allowed), target[rows], [classnames[int(t)] for t in target[rows]]


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


def evaluate_retrieval(model, data: str, query: str | None = None, gallery: str = "text", batch_size: int = 256,
                       num_workers: int | None = 0, score: str | None = None, match: str = "item",
                       candidates: str | None = None, rerank: int | None = None) -> dict:
    """Retrieval query->gallery and back (R@1/5/10, mAP, mAP@10), several items per sample on either side allowed.

    ``match``: what counts as a hit, ``item`` (the items of the query's own sample) or ``label`` (every item whose
    sample has the query's ``label.txt``; Symile-M3's protocol). With ``item``, items equal to one of another sample
    (a caption several samples carry) are counted and warned about: retrieval cannot tell such samples apart
    (``retrieval_distinct_*``). ``retrieval_samples_per_s``: samples decoded and embedded per second.
    With a text gallery (or text queries) the result also carries CLIP_benchmark's keys under ``clip_benchmark``
    (``match="item"`` only): ``text_retrieval_recall@k`` (each non-text item retrieves its texts) and
    ``image_retrieval_recall@k`` (each text retrieves its item; named "image" as in CLIP_benchmark whatever the
    non-text modality). ``_retrieval`` (the embeddings, each row's sample and group, the sample keys) and
    ``_recall_curve`` are for the report.

    Either side may be a tuple of modalities (``"image,audio"``): each sample's tuple ranks the items of the other
    side, or each item ranks the samples' tuples, by the model's N-way score (that direction only). The protocols
    of :mod:`.protocols`: ``candidates`` (a file, :mod:`.candidates`) evaluates the queries it lists, each ranking
    its own candidates (Symile-MIMIC; that direction only); ``rerank=k`` also reports each ranking with its top k
    re-ranked by the model's matching head (GRAM), under ``retrieval_<direction>_rerank_*``.
    """
    if match not in RETRIEVAL_MATCHES:
        raise ConfigError(f"match must be {' or '.join(RETRIEVAL_MATCHES)}, got {match!r}")
    if rerank is not None and rerank < 1:
        raise ConfigError(f"rerank must be >= 1, got {rerank}")
    galleries = modality_names(gallery)
    queries = query_modalities(model, query, galleries)
    names = queries + galleries
    emb = complete_samples(embed_shards(model, data, names, batch_size, num_workers), names)
    if not emb["keys"]:
        raise DataError(f"{data}: no usable samples to evaluate (with all of {', '.join(names)} present)")
    q, g = make_side(emb, queries), make_side(emb, galleries)
    method = model_score(model, score)
    labels = sample_labels(emb, data) if match == "label" else None
    listed = read_candidates(candidates, emb["keys"], f"a sample key of {data}") if candidates else None
    single = len(names) == 2
    directions = [(q, g), (g, q)] if single and listed is None else [(q, g)]
    ks = recall_ks(max(q.sample.shape[0], g.sample.shape[0]))
    out: dict[str, Any] = {"retrieval_n": len(emb["keys"]) if listed is None else len(listed),
                           "retrieval_match": match}
    curves = {}
    for a, b in directions:
        direction = abbrev(a.names, b.names)
        sets = candidate_sets(listed, a, b, emb["keys"], candidates) if listed is not None else None
        scores = score_function(a, b, method)
        metrics = rank(a, b, scores, ks, labels, sets)
        out.update({f"retrieval_{direction}_{k}": v for k, v in metrics.items() if headline(k)})
        curves[direction] = {k: metrics[f"R@{k}"] for k in ks}
        if rerank is not None:
            reranked = rank(a, b, scores, ks, labels, sets, (rerank, matching_rescore(model, a, b)))
            out.update({f"retrieval_{direction}_rerank_{k}": v for k, v in reranked.items() if headline(k)})
        if "_similarity" not in out:
            out["_similarity"] = scores(torch.arange(min(32, a.sample.shape[0])))[:, :64]
    if not single:
        out["retrieval_score"] = method
    out.update({k: v for k, v in (("retrieval_candidates", candidates), ("retrieval_rerank_k", rerank)) if v})
    if match == "item":
        out.update(warn_about_shared_items([q, g]))
    out["retrieval_samples_per_s"] = round(emb["samples_per_s"], 1)
    if single and listed is None:
        out.update(single_modality_extras(model, data, q, g, curves, labels, emb["keys"]))
    out["_recall_curve"] = curves
    out["skipped"] = emb["skipped"].get("counts", {})
    return out


def single_modality_extras(model, data: str, q: Side, g: Side, curves: dict, labels: list | None,
                           keys: list[str]) -> dict:
    """Between two single modalities: CLIP_benchmark's keys (hits by item only, its protocol) and the report's
    ``_retrieval`` (embeddings, each row's sample and group, the sample keys: to show examples)."""
    out: dict[str, Any] = {}
    query, gallery = q.names[0], g.names[0]
    directions = (abbrev(query, gallery), abbrev(gallery, query))
    kinds = (model.modalities[query].kind, model.modalities[gallery].kind)
    if "text" in kinds and kinds[0] != kinds[1] and labels is None:
        to_text, to_other = directions if kinds[1] == "text" else directions[::-1]
        out["clip_benchmark"] = {
            **{f"image_retrieval_recall@{k}": curves[to_other][k] for k in HEADLINE_KS},
            **{f"text_retrieval_recall@{k}": curves[to_text][k] for k in HEADLINE_KS},
        }
    out["_retrieval"] = {"data": data, "query": query, "gallery": gallery, "query_embeddings": q.rows[query],
                         "gallery_embeddings": g.rows[gallery], "query_groups": row_groups(q.sample, labels),
                         "gallery_groups": row_groups(g.sample, labels), "query_samples": q.sample,
                         "gallery_samples": g.sample, "keys": keys}
    return out


def sample_labels(emb: dict, data: str) -> list[str]:
    """Each evaluated sample's label (``label.txt``), for ``match="label"``; every sample needs one."""
    unlabelled = [key for key, label in zip(emb["keys"], emb["labels"]) if label is None]
    if unlabelled:
        raise DataError(f"{data}: {len(unlabelled)} of {len(emb['keys'])} samples have no label.txt (e.g. "
                        f"{unlabelled[0]!r}); --match label counts the items with the query's label as hits, so "
                        f"every sample needs one")
    return emb["labels"]


def warn_about_shared_items(sides: list[Side]) -> dict:
    """``retrieval_distinct_<name>``: how many distinct embeddings a modality's items have, where several samples
    share one (a repeated caption, or inputs the model maps to one point), with a warning: a query then finds the
    other samples' equal items as high as its own, and those count as wrong."""
    out = {}
    for side in sides:
        for name, rows in side.rows.items():
            distinct, shared = shared_items(rows, side.sample)
            if shared:
                out[f"retrieval_distinct_{name}"] = distinct
                log.warning("retrieval: the %d %s items have only %d distinct embeddings (repeated items, or inputs "
                            "the model maps to one point); %d items share theirs with other samples, and retrieval "
                            "cannot tell those apart: an equal item of another sample counts as wrong, so R@k is low "
                            "by construction. --match label counts the items with the query's label as hits",
                            rows.shape[0], name, distinct, shared)
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
