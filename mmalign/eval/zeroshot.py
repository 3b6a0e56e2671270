"""Zero-shot classification: class names x prompt templates -> averaged normalised text embeddings (CLIP)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import DataError
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


def read_templates(path: str | Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_TEMPLATES)
    templates = read_lines(path, "templates")
    bad = [t for t in templates if "{}" not in t and "{c}" not in t]
    if bad:
        raise DataError(f"{path}: template {bad[0]!r} has no '{{}}' where the class name goes")
    return templates


def fill(template: str, classname: str) -> str:
    return template.replace("{c}", classname).replace("{}", classname)


@torch.no_grad()
def zeroshot_classifier(
    model, classnames: Sequence[str], templates: Sequence[str], text_modality: str = "text", batch_size: int = 256
) -> torch.Tensor:
    """D x C classifier: for each class, the normalised mean of its normalised prompt embeddings (for a text
    modality whose ``output_norm`` is not ``l2``, the plain mean of its prompt embeddings, on their own scale)."""
    modality = model.modalities[text_modality]
    device = next(model.parameters()).device
    prompts = [fill(t, c) for c in classnames for t in templates]
    embeddings = []
    for start in range(0, len(prompts), batch_size):
        tokens = inputs_to(modality.tokenize(prompts[start:start + batch_size]), device)
        embeddings.append(model.encode(text_modality, tokens).float())
    per_prompt = torch.cat(embeddings).view(len(classnames), len(templates), -1)
    if modality.cfg.output_norm != "l2":
        return per_prompt.mean(dim=1).T
    return F.normalize(F.normalize(per_prompt, dim=-1).mean(dim=1), dim=-1).T


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
