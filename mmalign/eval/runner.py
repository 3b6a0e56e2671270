"""Evaluation entry points shared by ``mmalign eval`` and the end of training: shards in, headline numbers out."""
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
from ..data.pipeline import LABEL_KEYS, SkipStats, find_member
from ..errors import ConfigError, DataError
from ..io import atomic_write_text
from ..modalities.text import TextModality, parse_captions
from .captioning import caption_exact_match, caption_metrics
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


SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def caption_sources(data: str, name: str, extensions: tuple[str, ...], text: str,
                    stats: SkipStats) -> Iterator[tuple[str, bytes, str, list[str] | None, str | None]]:
    """(key, bytes, extension, reference captions or None, label or None) for each item to caption.

    ``data``: shards (their ``name`` member is captioned; the ``text`` member gives references, ``label.txt`` the
    class word), or files of the captioned modality: a folder (searched recursively), a glob, paths separated by
    ``::``. Samples without the modality or with unreadable references are skipped and counted in ``stats``.
    """
    if os.path.isdir(data):
        files = sorted(str(f) for f in Path(data).rglob("*") if f.suffix.lower().lstrip(".") in extensions)
        if not files:
            raise DataError(f"{data}: no {'/'.join(extensions)} files to caption")
    else:
        files = expand_urls(data)
    if not all(u.endswith(SHARD_SUFFIXES) for u in files):
        for f in files:
            ext = Path(f).suffix.lower().lstrip(".")
            if ext not in extensions:
                raise DataError(f"{f}: cannot caption a .{ext} file ({name} files are {', '.join(extensions)})")
            yield f, Path(f).read_bytes(), ext, None, None
        return
    import webdataset as wds

    for sample in wds.DataPipeline(wds.SimpleShardList(files), wds.tarfile_to_samples(handler=stats.tar_handler)):
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        member = find_member(sample, name, extensions)
        if member is None:
            stats.add(f"missing {name}", where)
            continue
        refs = None
        text_member = find_member(sample, text, TextModality.extensions)
        if text_member is not None:
            try:
                refs = parse_captions(sample[text_member], text_member.rsplit(".", 1)[-1])
            except DataError as e:
                stats.add(f"bad {text}", f"{where} ({e})")
                continue
        label = next((sample[k].decode("utf-8").strip() for k in LABEL_KEYS if k in sample), None)
        yield sample["__key__"], sample[member], member.rsplit(".", 1)[-1], refs, label


def evaluate_captions(model, data: str, out: str | Path, generation: GenerationConfig | None = None,
                      batch_size: int = 256) -> dict:
    """Caption every item of ``data`` (see ``caption_sources``) with a CoCa model, write ``out`` as JSONL, score.

    Each JSONL row holds ``key`` and ``caption``, plus ``references`` and ``label`` where the data has them.
    Returns ``caption_n``, ``captions`` (the path), ``caption_BLEU-1..4`` and ``caption_CIDEr`` over the items
    with references, and ``caption_exact_match`` (the class word appears in the caption) over those with labels.
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
        inputs = modality.collate([item for item, _ in batch])
        inputs = inputs.to(device) if torch.is_tensor(inputs) else {k: v.to(device) for k, v in inputs.items()}
        for (_, row), caption in zip(batch, model.generate_captions(inputs, gen, generator)):
            rows.append({"key": row["key"], "caption": caption, **{k: v for k, v in row.items() if k != "key"}})
        batch.clear()

    for key, raw, ext, refs, label in tqdm(caption_sources(data, cap.context, modality.extensions, cap.text, stats),
                                           desc="caption", unit="item", leave=False):
        try:
            item = modality.transform(modality.decode(raw, ext), train=False)
        except DataError as e:
            stats.add(f"bad {cap.context}", f"{key} ({e})")
            continue
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
    if stats.counts:
        result["caption_skipped"] = dict(stats.counts)
    result["_examples"] = rows[:8]
    return result
