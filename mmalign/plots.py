"""PNG plots and a markdown report for a run directory (matplotlib, no display needed)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .eval.runner import flat_results  # noqa: E402

log = logging.getLogger(__name__)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: Path, results: dict, extras: dict[str, Any]) -> list[Path]:
    """Loss/scale curves, similarity matrix, retrieval recall@k (the curve in ``extras["_recall_curve"]``, else the
    headline ks), per-class accuracy, the zero-shot confusion matrix and the PCA of the diagnostic embeddings
    (``extras["_embeddings"]``); returns the PNG paths."""
    written = []
    rows = _metrics(run_dir)
    if rows:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
        steps = [r["step"] for r in rows]
        ax1.plot(steps, [r["loss"] for r in rows])
        ax1.set(xlabel="step", ylabel="loss", title="training loss")
        ax2.plot(steps, [r["logit_scale"] for r in rows], color="tab:orange")
        ax2.set(xlabel="step", ylabel="logit scale", title="logit scale")
        written.append(_save(fig, run_dir / "loss_curve.png"))
    if "_similarity" in extras:
        sim = extras["_similarity"].numpy()
        fig, ax = plt.subplots(figsize=(6, 4))
        im = ax.imshow(sim, cmap="viridis", aspect="auto")
        ax.set(xlabel="gallery item", ylabel="query", title="cosine similarity (first queries)")
        fig.colorbar(im)
        written.append(_save(fig, run_dir / "similarity_matrix.png"))
    curves = extras.get("_recall_curve") or _recall_from_results(results)
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for direction, curve in sorted(curves.items()):
            ks = sorted(curve)
            ax.plot(ks, [curve[k] for k in ks], marker="o", label=direction)
        ax.set(xlabel="k", ylabel="recall@k", ylim=(0, 1.02), title="retrieval recall@k", xscale="log")
        ax.legend()
        written.append(_save(fig, run_dir / "retrieval_recall.png"))
    if "zeroshot_per_class_recall" in results:  # None: a class without samples
        per_class = results["zeroshot_per_class_recall"]
        fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(per_class)), 3.5))
        ax.bar(range(len(per_class)), [r or 0.0 for r in per_class.values()])
        ax.set_xticks(range(len(per_class)), list(per_class), rotation=45, ha="right")
        ax.set(ylabel="accuracy", ylim=(0, 1.02), title="zero-shot accuracy per class")
        written.append(_save(fig, run_dir / "per_class_accuracy.png"))
    if "zeroshot_confusion" in results:
        confusion = results["zeroshot_confusion"]
        written.append(plot_confusion(confusion["matrix"], confusion["classes"], run_dir / "confusion_matrix.png"))
    if "_embeddings" in extras:
        from .eval.diagnostics import embedding_pca_plot

        written.append(embedding_pca_plot(extras["_embeddings"], run_dir / "embedding_pca.png"))
    write_report(run_dir, results, written, extras.get("_captions"))
    return written


def _recall_from_results(results: dict) -> dict[str, dict[int, float]]:
    curves: dict[str, dict[int, float]] = {}
    for key, value in results.items():
        if key.startswith("retrieval_") and "_R@" in key:
            curves.setdefault(key.split("_")[1], {})[int(key.rsplit("@", 1)[1])] = value
    return curves


def plot_confusion(matrix: list[list[int]], classnames: list[str], path: Path) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted), counts written in the cells."""
    import numpy as np

    n = len(classnames)
    counts = np.asarray(matrix, dtype=int)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(max(4.0, 0.45 * n + 2), 16)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classnames, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classnames, fontsize=8)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, counts[i, j], ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title="zero-shot confusion matrix")
    fig.colorbar(im, fraction=0.046)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(run_dir: Path, results: dict, images: list[Path], captions: list[dict] | None = None) -> Path:
    """``report.md``: the headline numbers, example generated captions (if any), the plots."""
    lines = [f"# Run report: {run_dir}", "", "| metric | value |", "|---|---|"]
    for k, v in flat_results(results).items():
        if isinstance(v, float):
            lines.append(f"| {k} | {v:.4f} |")
        elif isinstance(v, (int, str)):
            lines.append(f"| {k} | {v} |")
    lines.append("")
    if captions:
        lines += ["## Generated captions", "", "| key | caption | a reference |", "|---|---|---|"]
        lines += [f"| {c['key']} | {c['caption']} | {(c.get('references') or [''])[0]} |" for c in captions]
        lines.append("")
    lines += [f"![{p.stem}]({p.name})" for p in images]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path

