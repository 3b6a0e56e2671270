"""``mmalign demo NAME``: build a demo data set from offline sources, train its recipe, evaluate, report."""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

from .config import load_config
from .errors import ConfigError, closest

log = logging.getLogger(__name__)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# How a builder's paths fill a recipe: every single-run demo builds train/test shards, classes and templates.
ZEROSHOT_AND_RETRIEVAL = {
    "data.train": "train", "eval.zeroshot.data": "test", "eval.zeroshot.classes": "classes",
    "eval.zeroshot.templates": "templates", "eval.retrieval.data": "test",
}

# demo name -> (data builder module in data_tools, recipe file, how the builder's paths fill the recipe)
DEMOS: dict[str, tuple[str, str, dict[str, str]]] = {
    "lit": ("data_tools.digits", "lit_image_text.yaml", ZEROSHOT_AND_RETRIEVAL),
    "clap": ("data_tools.spoken_words", "clap_audio_text.yaml", ZEROSHOT_AND_RETRIEVAL),
    "ecg": ("data_tools.ecg", "ecg_text.yaml", ZEROSHOT_AND_RETRIEVAL),
    "coca": ("data_tools.digits", "coca.yaml", {
        **ZEROSHOT_AND_RETRIEVAL, "eval.caption.data": "test", "model.modalities.text.tokenizer": "tokenizer",
    }),
}


def run_demo(name: str, workdir: Path, overrides: list[str] | None = None) -> dict:
    if name not in DEMOS:
        raise ConfigError(f"unknown demo {name!r}{closest(name, DEMOS)}; demos: {', '.join(DEMOS)}")
    module, recipe, fill = DEMOS[name]
    log.info("building demo data for %r in %s", name, workdir / "demo_data" / name)
    paths = importlib.import_module(module).build(workdir / "demo_data" / name)
    sets = [f"{key}={paths[source]}" for key, source in fill.items()]
    sets.append(f"run_dir={workdir / f'demo-{name}'}")
    cfg = load_config(RECIPES / recipe, sets + list(overrides or []))
    from .train import train

    result = train(cfg)
    result["report"] = str(Path(cfg.run_dir) / "report.md")
    result["report_html"] = str(Path(cfg.run_dir) / "report.html")
    return result
