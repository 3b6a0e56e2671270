"""Zero-shot classification: class names x prompt templates (or each class's own prompts) -> averaged normalised
text embeddings (CLIP); the classes file, and the shard labels checked against it before anything is encoded."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..data import expand_urls
from ..data.pipeline import shard_labels
from ..errors import DataError, closest
from ..modalities import inputs_to

DEFAULT_TEMPLATES = ("{}", "a photo of a {}.", "an example of {}.")


def read_lines(path: str | Path, what: str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not lines:
        raise DataError(f"{what} file is empty: {path}")
    return lines


def read_classes(path: str | Path) -> dict[str, list[str]]:
    """A classes file: class name -> its own prompts (empty: the class name goes into the templates).

    One class per line, in order; ``name: a prompt`` gives the class a prompt of its own (a line per prompt, for
    several), e.g. ``local: a woven textile with a small local defect``. The class name is what the samples'
    ``label.txt`` says; the text before the first ``:`` on a prompt line. Lines starting with ``#`` are comments.
    """
    classes: dict[str, list[str]] = {}
    plain: set[str] = set()
    for number, line in enumerate(read_lines(path, "classes"), 1):
        name, colon, prompt = (part.strip() for part in line.partition(":"))
        if not name:
            raise DataError(f"{path}: line {number} ({line!r}) has no class name before ':'")
        if name in plain or (not prompt and name in classes):
            raise DataError(f"{path}: class {name!r} is listed twice" if not (prompt or classes[name]) else
                            f"{path}: class {name!r} is listed both alone (prompts from the templates) and with "
                            f"prompts of its own; keep one")
        if not prompt:
            plain.add(name)
        classes.setdefault(name, []).extend([prompt] if prompt else [])
    return classes


def read_templates(path: str | Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_TEMPLATES)
    templates = read_lines(path, "templates")
    bad = [t for t in templates if "{}" not in t and "{c}" not in t]
    if bad:
        raise DataError(f"{path}: template {bad[0]!r} has no '{{}}' where the class name goes")
    return templates


def check_labels(data: str, classnames: Sequence[str], source: str | Path) -> Counter:
    """Fail before anything is encoded when a sample of ``data`` has no label or one not in ``classnames`` (read
    from the shards' label members only; ``source`` names where the classes come from, e.g. the classes file);
    returns the samples per label."""
    counts = shard_labels(expand_urls(data))
    known = set(classnames)
    unknown = sorted(label for label in counts if label is not None and label not in known)
    if unknown:
        n = sum(counts[label] for label in unknown)
        raise DataError(f"{data}: {n} sample(s) have labels not in {source}: {', '.join(unknown[:5])}"
                        + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
                        + f"{closest(unknown[0], known)}; each sample's label.txt must name one of the classes")
    if counts.get(None):
        raise DataError(f"{data}: {counts[None]} sample(s) have no label.txt (each needs one naming its class)")
    return counts


def fill(template: str, classname: str) -> str:
    return template.replace("{c}", classname).replace("{}", classname)


@torch.no_grad()
def zeroshot_classifier(
    model, classnames: Sequence[str], templates: Sequence[str], text_modality: str = "text", batch_size: int = 256,
    prompts: Mapping[str, Sequence[str]] | None = None,
) -> torch.Tensor:
    """D x C classifier: for each class, the normalised mean of its normalised prompt embeddings. A class's prompts
    are ``prompts[class]`` where given (non-empty), else the templates filled with its name (CLIP)."""
    modality = model.modalities[text_modality]
    device = next(model.parameters()).device
    per_class = [list((prompts or {}).get(c) or [fill(t, c) for t in templates]) for c in classnames]
    flat = [p for class_prompts in per_class for p in class_prompts]
    embeddings = []
    for start in range(0, len(flat), batch_size):
        tokens = inputs_to(modality.tokenize(flat[start:start + batch_size]), device)
        embeddings.append(F.normalize(model.encode(text_modality, tokens).float(), dim=-1))
    owner = torch.repeat_interleave(torch.arange(len(classnames)), torch.tensor([len(p) for p in per_class]))
    sums = torch.zeros(len(classnames), embeddings[0].shape[1], device=device).index_add_(
        0, owner.to(device), torch.cat(embeddings))
    return F.normalize(sums, dim=-1).T


def zeroshot_accuracy(
    features: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor, topk: tuple[int, ...] = (1, 5)
) -> dict:
    """Top-k accuracy and mean per-class recall (CLIP_benchmark's ``acc1``/``acc5``/``mean_per_class_recall``)."""
    return classification_metrics(features.float() @ classifier.float(), labels, topk)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> dict:
    """``zeroshot_accuracy`` from any N x C class scores (e.g. N-way scores of modality tuples)."""
    n_classes = logits.shape[1]
    out = {}
    order = logits.topk(min(max(topk), n_classes), dim=1).indices
    for k in topk:
        out[f"acc{k}"] = (order[:, :k] == labels[:, None]).any(dim=1).float().mean().item()
    pred = order[:, 0]
    recalls = {c: (pred[labels == c] == c).float().mean().item() for c in range(n_classes) if (labels == c).any()}
    out["mean_per_class_recall"] = sum(recalls.values()) / len(recalls)
    out["per_class_recall"] = recalls  # class index -> recall, for the classes that have samples
    out["predictions"] = pred.tolist()
    return out
