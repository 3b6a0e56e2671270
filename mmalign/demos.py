"""``mmalign demo NAME``: build a demo data set from offline sources, train its recipe, evaluate, report.

A demo in ``COMPARISONS`` trains several recipes (or one recipe with overrides) on the same data, steps and seed,
and reports them side by side: a markdown table in ``<workdir>/demo-NAME/report.md`` (also printed to stderr) and
each variant's headline numbers, prefixed with its label, in the result.
"""
from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

from .config import load_config
from .errors import ConfigError, closest
from .io import atomic_write_text, write_json

log = logging.getLogger(__name__)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

DIGIT_SUMS_FILL = {
    "data.train": "train", "eval.zeroshot.data": "test", "eval.zeroshot.classes": "classes",
    "eval.zeroshot.templates": "templates",
}
# demo name -> (data builder module in data_tools, recipe file, how the builder's paths fill the recipe)
DEMOS: dict[str, tuple[str, str, dict[str, str]]] = {
    "lit": ("data_tools.digits", "lit_image_text.yaml", {
        "data.train": "train", "eval.zeroshot.data": "test", "eval.zeroshot.classes": "classes",
        "eval.zeroshot.templates": "templates", "eval.retrieval.data": "test",
    }),
    "symile": ("data_tools.digit_sums", "symile.yaml", DIGIT_SUMS_FILL),
    "gram": ("data_tools.digit_sums", "gram.yaml", DIGIT_SUMS_FILL),
}

# demo name -> {label: (recipe file, overrides)}: trainings run in order, each in <workdir>/demo-NAME/<label>.
# Symile, GRAM and pairwise CLIP on the same higher-order data: `demo symile` and `demo gram` both compare the three.
HIGHER_ORDER = {
    "symile": ("symile.yaml", []),
    "gram": ("gram.yaml", []),
    "clip": ("symile.yaml", ["loss.name=clip", "loss.kwargs={}"]),
}
COMPARISONS: dict[str, dict[str, tuple[str, list[str]]]] = {"symile": HIGHER_ORDER, "gram": HIGHER_ORDER}


def run_demo(name: str, workdir: Path, overrides: list[str] | None = None) -> dict:
    if name not in DEMOS:
        raise ConfigError(f"unknown demo {name!r}{closest(name, DEMOS)}; demos: {', '.join(DEMOS)}")
    module, recipe, fill = DEMOS[name]
    log.info("building demo data for %r in %s", name, workdir / "demo_data" / name)
    paths = importlib.import_module(module).build(workdir / "demo_data" / name)
    sets = [f"{key}={paths[source]}" for key, source in fill.items()]
    from .train import train

    if name not in COMPARISONS:
        cfg = load_config(RECIPES / recipe, sets + [f"run_dir={workdir / f'demo-{name}'}"] + list(overrides or []))
        result = train(cfg)
        result["report"] = str(Path(cfg.run_dir) / "report.md")
        return result
    root = workdir / f"demo-{name}"
    runs = {}
    for label, (variant_recipe, variant_sets) in COMPARISONS[name].items():
        log.info("demo %s: training %r (%d of %d)", name, label, len(runs) + 1, len(COMPARISONS[name]))
        cfg = load_config(RECIPES / variant_recipe,
                          sets + variant_sets + [f"run_dir={root / label}"] + list(overrides or []))
        runs[label] = train(cfg)
    return comparison_report(root, runs, paths.get("classes"))


def comparison_report(root: Path, runs: dict[str, dict], classes: str | None = None) -> dict:
    """Side-by-side table of the variants' headline numbers: ``root/report.md``, stderr, and the result dict."""
    columns = sorted({k for r in runs.values() for k, v in r.items()
                      if isinstance(v, (int, float, str)) and k not in ("run_dir", "report")})
    lines = ["| objective | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, r in runs.items():
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    result: dict = {f"{label}_{k}": v for label, r in runs.items() for k, v in r.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if classes:
        n = len([c for c in Path(classes).read_text().splitlines() if c.strip()])
        result["chance_top1"] = 1 / n
        lines += ["", f"Chance top-1 accuracy: {1 / n:.3f} ({n} classes)."]
    table = "\n".join(lines)
    print(table, file=sys.stderr)
    atomic_write_text(root / "report.md", f"# {root.name}: objectives compared\n\n{table}\n\n"
                      + "\n".join(f"- {label}: [{label}/report.md]({label}/report.md)" for label in runs) + "\n")
    result["run_dir"] = str(root)
    result["report"] = str(root / "report.md")
    write_json(root / "results.json", result)
    return result
