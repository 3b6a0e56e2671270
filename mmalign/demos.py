"""``mmalign demo NAME``: build a demo data set from offline sources, train its recipe, evaluate, report.

A demo listed in ``COMPARISONS`` trains its recipe once per variant (a few recipe overrides) and seed, on the same
data, and reports the mean and standard deviation over seeds of each variant's headline numbers.
"""
from __future__ import annotations

import importlib
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from . import recipes
from .config import Config
from .errors import ConfigError, closest
from .io import write_json

log = logging.getLogger(__name__)

# How a builder's paths fill a recipe: every demo builds train/test shards, classes and templates.
ZEROSHOT = {
    "data.train": "train", "eval.zeroshot.data": "test", "eval.zeroshot.classes": "classes",
    "eval.zeroshot.templates": "templates",
}
ZEROSHOT_AND_RETRIEVAL = {**ZEROSHOT, "eval.retrieval.data": "test"}

# demo name -> (data builder module in mmalign.demo_data, shipped recipe, how the builder's paths fill the recipe)
DEMOS: dict[str, tuple[str, str, dict[str, str]]] = {
    "lit": ("digits", "lit_image_text.yaml", ZEROSHOT_AND_RETRIEVAL),
    "clap": ("spoken_words", "clap_audio_text.yaml", ZEROSHOT_AND_RETRIEVAL),
    "ecg": ("ecg", "ecg_text.yaml", ZEROSHOT_AND_RETRIEVAL),
    "coca": ("digits", "coca.yaml", {
        **ZEROSHOT_AND_RETRIEVAL, "eval.caption.data": "test", "model.modalities.text.tokenizer": "tokenizer",
    }),
    "cwcl": ("emoji", "cwcl.yaml", ZEROSHOT_AND_RETRIEVAL),  # a comparison: see COMPARISONS
    "symile": ("digit_sums", "symile.yaml", ZEROSHOT_AND_RETRIEVAL),  # a comparison: see COMPARISONS
    "gram": ("digit_sums", "gram.yaml", ZEROSHOT_AND_RETRIEVAL),
}


@dataclass(frozen=True)
class Comparison:
    """Variants of a demo's recipe (name -> overrides; [] is the recipe as is), each trained with every seed.

    ``findings``: a markdown file beside the shipped recipes about what the comparison shows, written to the run directory as
    ``findings.md`` with ``{<variant>_<metric>_mean}``-style fields filled from the summary. ``variant_recipes``: a
    variant that starts from another shipped recipe (on the same demo data) instead of the demo's.
    """

    variants: dict[str, list[str]]
    metrics: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    findings: str | None = None
    variant_recipes: dict[str, str] = field(default_factory=dict)

    def load(self, variant: str, recipe: str, overrides: list[str]) -> Config:
        """The config of ``variant`` (the demo's ``recipe`` unless it has its own), with its overrides and then
        ``overrides``."""
        return recipes.load(self.variant_recipes.get(variant, recipe), [*self.variants[variant], *overrides])


COMPARISONS: dict[str, Comparison] = {
    # CWCL as published, its weights centred, and centred + sharpened (gamma = 7 puts about half of a row's target
    # on its own pair at B = 64 with MiniLM's features; see recipes/cwcl.findings.md).
    "cwcl": Comparison(
        {"clip": ["loss.name=clip", "loss.kwargs={}"],
         "cwcl": ["loss.kwargs={weights_from: text}"],
         "cwcl_centred": ["loss.kwargs={weights_from: text, center: true}"],
         "cwcl_sharp": ["loss.kwargs={weights_from: text, center: true, sharpness: 7}"]},
        metrics=("zeroshot_top1", "zeroshot_top5", "retrieval_i2t_R@1", "retrieval_t2i_R@1",
                 "modality_gap_image_text", "alignment_image_text", "uniformity_image", "final_loss",
                 "final_logit_scale", "final_cwcl_positive_mass"),
        findings="cwcl.findings.md",
    ),
    # One seed: three trainings (Symile's n^2 negatives are the slow one) within the 10-minute demo budget. GRAM as
    # gram.yaml (its paper's settings); pairwise CLIP on symile.yaml's data and towers with CLIP's unit-length
    # embeddings and logit scale.
    "symile": Comparison(
        {"symile": [], "gram": [],
         "clip": ["loss.name=clip", "loss.kwargs={}", "model.logit_scale={init: 10.0}",
                  *(f"model.modalities.{m}.output_norm=l2" for m in ("image", "glyph", "text"))]},
        metrics=("zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class_recall", "retrieval_t2ig_R@1",
                 "final_loss"),
        seeds=(0,),
        findings="symile.findings.md",
        variant_recipes={"gram": "gram.yaml"},
    ),
}


def run_demo(name: str, workdir: Path, overrides: list[str] | None = None) -> dict:
    if name not in DEMOS:
        raise ConfigError(f"unknown demo {name!r}{closest(name, DEMOS)}; demos: {', '.join(DEMOS)}")
    module, recipe, fill = DEMOS[name]
    log.info("building demo data for %r in %s", name, workdir / "demo_data" / name)
    paths = importlib.import_module(f".demo_data.{module}", __package__).build(workdir / "demo_data" / name)
    sets = [f"{key}={paths[source]}" for key, source in fill.items()]
    run_dir = workdir / f"demo-{name}"
    if name in COMPARISONS:
        return run_comparison(COMPARISONS[name], recipe, sets, run_dir, list(overrides or []))
    cfg = recipes.load(recipe, [*sets, f"run_dir={run_dir}", *(overrides or [])])
    from .train import train

    result = train(cfg)
    result["report"] = str(Path(cfg.run_dir) / "report.md")
    result["report_html"] = str(Path(cfg.run_dir) / "report.html")
    return result


def run_comparison(comparison: Comparison, recipe: str, sets: list[str], run_dir: Path,
                   overrides: list[str]) -> dict:
    """Train every variant with every seed (runs in ``run_dir/<variant>-seed<k>``); the summary goes to
    ``run_dir/results.json`` and ``run_dir/report.md``. ``overrides`` apply to every run, after the variant's."""
    from .train import train

    runs: dict[str, list[dict]] = {v: [] for v in comparison.variants}
    for seed in comparison.seeds:
        for variant in comparison.variants:
            log.info("comparison %s: %s, seed %d", run_dir.name, variant, seed)
            cfg = comparison.load(variant, recipe, [*sets, f"seed={seed}",
                                                    f"run_dir={run_dir / f'{variant}-seed{seed}'}", *overrides])
            runs[variant].append(train(cfg))
    result: dict = summarise(runs, comparison.metrics)
    result.update({"seeds": len(comparison.seeds), "run_dir": str(run_dir), "report": str(run_dir / "report.md")})
    write_json(run_dir / "results.json", result)
    report = write_comparison_report(run_dir, runs, comparison.metrics, result)
    log.info("%s", report.read_text())  # the table, on stderr
    if comparison.findings:
        template = recipes.text(comparison.findings)
        (run_dir / "findings.md").write_text(template.format_map(result))
    return result


def summarise(runs: dict[str, list[dict]], metrics: tuple[str, ...]) -> dict[str, float]:
    """``<variant>_<metric>_mean``, ``_std`` (sample standard deviation over seeds) and ``_ci95`` of every reported
    metric. ``_ci95`` is the half-width of the 95% confidence interval of the mean, t_{0.975, n-1} std / sqrt(n)
    (Student's t over the n seeds; 4.30 std / sqrt(3) for 3 seeds); 0 with one seed, where it cannot be estimated."""
    from scipy.stats import t

    out = {}
    for variant, results in runs.items():
        for metric in metrics:
            values = [r[metric] for r in results if metric in r]
            if values:
                n = len(values)
                std = statistics.stdev(values) if n > 1 else 0.0
                out[f"{variant}_{metric}_mean"] = statistics.fmean(values)
                out[f"{variant}_{metric}_std"] = std
                out[f"{variant}_{metric}_ci95"] = float(t.ppf(0.975, n - 1)) * std / n**0.5 if n > 1 else 0.0
    return out


def write_comparison_report(run_dir: Path, runs: dict[str, list[dict]], metrics: tuple[str, ...],
                            summary: dict[str, float]) -> Path:
    """Markdown: mean +- std and the 95% confidence interval of the mean per variant and metric (from ``summary``,
    see ``summarise``), the per-seed values, and links to every run's report."""
    variants = list(runs)
    lines = [f"# Comparison: {', '.join(variants)} ({len(next(iter(runs.values())))} seeds each)", "",
             "| metric | " + " | ".join(f"{v} (mean ± std [95% CI])" for v in variants) + " | per seed |",
             "|---|" + "---|" * (len(variants) + 1)]
    for metric in metrics:
        cells, seeds = [], []
        for v in variants:
            values = [r[metric] for r in runs[v] if metric in r]
            mean, std, ci = (summary.get(f"{v}_{metric}_{k}") for k in ("mean", "std", "ci95"))
            cells.append(f"{mean:.4f} ± {std:.4f} [{mean - ci:.4f}, {mean + ci:.4f}]" if mean is not None else "-")
            if values:
                seeds.append(f"{v}: " + ", ".join(f"{x:.3f}" for x in values))
        lines.append(f"| {metric} | " + " | ".join(cells) + " | " + "; ".join(seeds) + " |")
    lines += ["", "Runs: " + ", ".join(f"[{Path(r['run_dir']).name}]({Path(r['run_dir']).name}/report.md)"
                                       for v in variants for r in runs[v])]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
