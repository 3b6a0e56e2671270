"""The model card of an exported folder: ``README.md`` as the Hugging Face hub reads it (YAML front matter with
``library_name``, ``tags``, ``base_model`` and ``pipeline_tag``, then markdown), so a folder pushed to a hub reads
like one: what was aligned with what, from which base checkpoints, the evaluation results the run measured
(``results.json``) and the recipe it was trained with (the run's resolved ``config.json``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .eval.runner import flat_results

CARD_NAME = "README.md"
LIBRARIES = {"dual": "transformers", "open_clip": "open_clip"}  # export layout -> what loads the folder as a whole
PIPELINE_TAGS = {("image", "text"): "zero-shot-image-classification",
                 ("audio", "text"): "zero-shot-audio-classification"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def base_checkpoint(section: dict) -> str | None:
    """The weights a tower started from, from its recipe section; None when it was built from scratch."""
    if section.get("init") == "scratch":
        return None
    model, pretrained = section.get("model"), section.get("pretrained")
    if pretrained:
        return f"{model} ({pretrained})" if model else pretrained
    return model if str(section.get("tower", "")).startswith("hf") else None  # HF towers load the model's weights


def training_mode(section: dict) -> str:
    if section.get("lora"):
        return f"LoRA (r={section['lora'].get('r')})"
    if section.get("lock"):
        unlocked = section.get("unlocked_layers") or 0
        return f"locked except the last {unlocked} block(s)" if unlocked else "locked"
    return "trained"


def front_matter(kinds: dict[str, str], recipe: dict, layout: str) -> dict[str, Any]:
    sections = (recipe.get("model") or {}).get("modalities") or {}
    bases = [base_checkpoint(s) for s in sections.values()]
    hub_ids = sorted({b for b in bases if b and HUB_ID.fullmatch(b) and not Path(b).exists()})
    loss = (recipe.get("loss") or {}).get("name")
    meta: dict[str, Any] = {"library_name": LIBRARIES.get(layout, "mmalign"),
                            "tags": ["mmalign", "multimodal", "contrastive-learning",
                                     *([loss] if loss else []), *sorted(set(kinds.values()))]}
    if hub_ids:
        meta["base_model"] = hub_ids
    meta["pipeline_tag"] = PIPELINE_TAGS.get(tuple(sorted(set(kinds.values()))), "feature-extraction")
    return meta


def how_to_load(layout: str, names: list[str]) -> list[str]:
    if layout == "dual":
        return ["```python", "from transformers import AutoModel", "", 'model = AutoModel.from_pretrained("PATH")',
                "# embeddings: model.get_<modality>_features(...), L2-normalised; logit_scale.exp() scales them",
                "```"]
    if layout == "open_clip":
        return ["```python", "import open_clip", "",
                'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH")',
                'tokenizer = open_clip.get_tokenizer("local-dir:PATH")', "```"]
    return [f"One transformers folder per modality ({', '.join(f'`{n}/`' for n in names)}) and the projection "
            "heads in `heads.safetensors`, described in `mmalign_export.json`: load each folder with its class and "
            "apply its head as that file says (format: `mmalign/export.py`)."]


def model_card(model, info: dict, run: dict | None) -> str:
    """The card's text for ``model`` (an ``AlignmentModel``) exported with ``info`` (``mmalign_export.json``);
    ``run`` is the run it comes from (``rundir.source_run``: its name, recipe and results), None when unknown."""
    kinds = {name: m.kind for name, m in model.config.modalities.items()}
    layout = info.get("layout", info.get("format", ""))
    recipe, results = (run or {}).get("recipe") or {}, (run or {}).get("results") or {}
    sections = (recipe.get("model") or {}).get("modalities") or {}
    loss = (recipe.get("loss") or {}).get("name", "an alignment")
    steps = results.get("steps") or (recipe.get("train") or {}).get("steps")
    lines = ["---", yaml.safe_dump(front_matter(kinds, recipe, layout), sort_keys=False).strip(), "---", "",
             f"# {run['name'] if run else 'mmalign model'}", "",
             f"Aligns {' and '.join(kinds)} in one {model.config.embed_dim}-dimensional embedding space, trained "
             f"with mmalign {__version__} ({loss} objective" + (f", {steps} steps" if steps else "") + "). "
             f"Exported as `{info.get('format')}` (layout `{layout}`).", "",
             "## Towers", "", "| modality | kind | tower | base checkpoint | training |", "|---|---|---|---|---|"]
    for name, kind in kinds.items():
        section = sections.get(name, {})
        base = base_checkpoint(section) if section else None
        lines.append(f"| {name} | {kind} | {section.get('tower', '?')} | "
                     f"{base or ('from scratch' if section else 'unknown (no training recipe found)')} | "
                     f"{training_mode(section) if section else '?'} |")
    lines += ["", "## Evaluation results", ""]
    numbers = {k: v for k, v in flat_results(results).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numbers:
        lines += ["From the run's `results.json` (its evaluation sets are named in the recipe below).", "",
                  "| metric | value |", "|---|---|", *(f"| {k} | {v:.4g} |" for k, v in numbers.items())]
    else:
        lines.append("No `results.json` was found next to the model: this export carries no evaluation results.")
    lines += ["", "## How to load", "", *how_to_load(layout, list(kinds)), "", "## Training recipe", ""]
    if recipe:
        lines += ["The run's resolved recipe (`mmalign train` takes it as is):", "", "```yaml",
                  yaml.safe_dump(recipe, sort_keys=False).strip(), "```"]
    else:
        lines.append("No training recipe was found next to the model.")
    return "\n".join(lines) + "\n"


def write_model_card(model, out: Path, info: dict, run: dict | None) -> Path:
    """``out/README.md`` (see ``model_card``)."""
    path = Path(out) / CARD_NAME
    path.write_text(model_card(model, info, run))
    return path
