"""Embedding-space diagnostics to log every run: modality gap, alignment, uniformity, and a PCA plot.

All functions L2-normalise their inputs (idempotent for the normalised embeddings the model produces), run without
gradient, and return plain floats. Alignment and uniformity are the regularisers of :mod:`mmalign.losses.variants`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..losses import alignment_loss, uniformity_loss


@torch.no_grad()
def modality_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mean_i a_n,i - mean_j b_n,j||: distance between the centroids of the two modalities' normalised
    embeddings (Liang et al. 2022, "Mind the Gap"). 0 for identical sets, at most 2."""
    return (F.normalize(a.float(), dim=-1).mean(0) - F.normalize(b.float(), dim=-1).mean(0)).norm().item()


@torch.no_grad()
def alignment(a: torch.Tensor, b: torch.Tensor, alpha: float = 2.0) -> float:
    """mean_i ||a_i - b_i||^alpha over paired, normalised rows (Wang & Isola 2020); lower = better aligned."""
    return alignment_loss(F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1), alpha).item()


@torch.no_grad()
def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """log mean_{i != j} exp(-t ||x_i - x_j||^2) of normalised rows (Wang & Isola 2020); lower = more uniform."""
    return uniformity_loss(F.normalize(x.float(), dim=-1), t).item()


def embedding_diagnostics(embeddings: dict[str, torch.Tensor]) -> dict[str, float]:
    """All diagnostics of paired embeddings (row i of every modality is one sample): ``modality_gap_<a>_<b>`` and
    ``alignment_<a>_<b>`` for every pair of modalities, ``uniformity_<m>`` for each."""
    names = list(embeddings)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            out[f"modality_gap_{a}_{b}"] = modality_gap(embeddings[a], embeddings[b])
            out[f"alignment_{a}_{b}"] = alignment(embeddings[a], embeddings[b])
    out.update({f"uniformity_{m}": uniformity(x) for m, x in embeddings.items()})
    return out


@torch.no_grad()
def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """Projection of the rows of ``x`` (N x D) on its first two principal components (exact SVD), N x 2."""
    centred = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    proj = centred @ vh[:2].T
    return F.pad(proj, (0, 2 - proj.shape[1]))  # fewer than 2 components when D or N < 2


@torch.no_grad()
def embedding_pca_plot(
    embeddings: dict[str, torch.Tensor], path: str | Path, connect_pairs: bool = True, title: str | None = None
) -> Path:
    """Write a PNG of all modalities' normalised embeddings projected on their joint first two principal axes.

    Points are coloured per modality; with ``connect_pairs`` and equal row counts, row i of every modality is joined
    to row i of the first one by a thin line. The default title gives the modality gap of the first two modalities.
    Uses the Agg canvas directly (no pyplot, no global backend change). Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    names = list(embeddings)
    feats = [F.normalize(embeddings[m].detach().float().cpu(), dim=-1) for m in names]
    if len({f.shape[1] for f in feats}) != 1:
        raise ValueError(f"embedding_pca_plot needs one embedding width, got {[tuple(f.shape) for f in feats]}")
    proj = pca_2d(torch.cat(feats)).split([f.shape[0] for f in feats])

    fig = Figure(figsize=(5.5, 5.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if connect_pairs and len(names) > 1 and len({p.shape[0] for p in proj}) == 1:
        segments = torch.stack([torch.stack([proj[0], p], dim=1) for p in proj[1:]]).flatten(0, 1)
        ax.add_collection(LineCollection(segments.numpy(), colors="0.6", linewidths=0.4, alpha=0.5, zorder=1))
    for name, p in zip(names, proj):
        ax.scatter(p[:, 0].numpy(), p[:, 1].numpy(), s=10, label=name, alpha=0.8, zorder=2)
    if title is None and len(names) > 1:
        title = f"modality gap ({names[0]}, {names[1]}) = {modality_gap(feats[0], feats[1]):.3f}"
    if title:
        ax.set_title(title)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path
