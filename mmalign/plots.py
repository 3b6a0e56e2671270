"""PNG plots and a markdown report for a run directory (matplotlib, no display needed)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: Path, results: dict, extras: dict[str, Any]) -> list[Path]:
    """Loss/scale curves, similarity matrix, retrieval recall@k, per-class accuracy and the PCA of the diagnostic
    embeddings (``extras["_embeddings"]``); returns the PNG paths."""
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
    recall = {k: v for k, v in results.items() if k.startswith("retrieval_") and "_R@" in k}
    if recall:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for direction in sorted({k.split("_")[1] for k in recall}):
            ks = sorted(int(k.rsplit("@", 1)[1]) for k in recall if k.split("_")[1] == direction)
            ax.plot(ks, [recall[f"retrieval_{direction}_R@{k}"] for k in ks], marker="o", label=direction)
        ax.set(xlabel="k", ylabel="recall@k", ylim=(0, 1.02), title="retrieval recall@k")
        ax.legend()
        written.append(_save(fig, run_dir / "retrieval_recall.png"))
    if "_per_class" in extras:
        per_class = extras["_per_class"]
        fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(per_class)), 3.5))
        ax.bar(range(len(per_class)), list(per_class.values()))
        ax.set_xticks(range(len(per_class)), list(per_class), rotation=45, ha="right")
        ax.set(ylabel="accuracy", ylim=(0, 1.02), title="zero-shot accuracy per class")
        written.append(_save(fig, run_dir / "per_class_accuracy.png"))
    if "_embeddings" in extras:
        from .eval.diagnostics import embedding_pca_plot

        written.append(embedding_pca_plot(extras["_embeddings"], run_dir / "embedding_pca.png"))
    write_report(run_dir, results, written)
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(run_dir: Path, results: dict, images: list[Path]) -> Path:
    lines = [f"# Run report: {run_dir}", "", "| metric | value |", "|---|---|"]
    for k, v in results.items():
        if isinstance(v, float):
            lines.append(f"| {k} | {v:.4f} |")
        elif isinstance(v, (int, str)):
            lines.append(f"| {k} | {v} |")
    lines.append("")
    lines += [f"![{p.stem}]({p.name})" for p in images]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
