"""Recipes load into typed configs; bad keys, types and values are named in one-line errors."""
from pathlib import Path

import pytest

from mmalign.build import build
from mmalign.config import load_config
from mmalign.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_every_recipe_loads_and_builds_its_model_and_objective(tiny_text_model, tiny_hf_clip):
    """Each recipe as a user runs it, its hub towers swapped for tiny local ones with --set overrides (no network):
    the model and the objective build, and they fit each other."""
    recipes = sorted(RECIPES.glob("*.yaml"))
    assert len(recipes) >= 8
    for recipe in recipes:
        sets = []
        for name, m in load_config(recipe).model.modalities.items():
            if m.tower == "hf":
                sets.append(f"model.modalities.{name}.model={tiny_text_model}")
            elif m.tower == "hf_clip":  # proj: none keeps the checkpoint's projection, so embed_dim is its width
                sets += [f"model.modalities.{name}.model={tiny_hf_clip}", "model.embed_dim=16"]
            elif m.tower == "coca_decoder":
                sets.append(f"model.modalities.{name}.tokenizer={tiny_text_model}")
        cfg, model, objective = build(load_config(recipe, sets))
        assert model.names == list(cfg.model.modalities) and set(objective.modalities) == set(model.names), recipe.name
        assert (model.logit_bias is not None) == objective.requirements.logit_bias, recipe.name
        assert cfg.model.nway_score == objective.requirements.nway_score, recipe.name


def test_overrides_are_typed():
    cfg = load_config(RECIPES / "lit_image_text.yaml", ["train.lr=0.01", "data.batch_size=7",
                                                        "model.modalities.image.tower_kwargs={width: 8}"])
    assert cfg.train.lr == 0.01 and cfg.data.batch_size == 7
    assert cfg.model.modalities["image"].tower_kwargs == {"width": 8}
    assert type(cfg.model.modalities["image"]).__name__ == "ImageConfig"


def test_exponent_numbers_without_a_dot_are_numbers():
    """PyYAML reads ``1e-4`` as a string (YAML 1.1 wants ``1.0e-4``); a float field takes it as the number."""
    cfg = load_config(RECIPES / "lit_image_text.yaml", ["train.lr=4e-3", "train.weight_decay=1E-2"])
    assert cfg.train.lr == 4e-3 and cfg.train.weight_decay == 1e-2
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'fast'"):
        load_config(RECIPES / "lit_image_text.yaml", ["train.lr=fast"])


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrr' \(did you mean 'lr'\?\)"):
        load_config(RECIPES / "lit_image_text.yaml", ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match="did you mean 'max_length'"):
        load_config(RECIPES / "lit_image_text.yaml", ["model.modalities.text.max_lenght=3"])


def test_missing_required_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run_dir: x\nmodel:\n  modalities:\n    image: {}\n    text: {model: m}\n")
    with pytest.raises(ConfigError, match="missing required key 'data.train'"):
        load_config(recipe)


def test_recipes_load_without_importing_the_modalities():
    """config sits below the modalities: every built-in kind's section is a plain dataclass config imports, so a
    recipe loads into typed sections in a fresh interpreter that has imported no modality code (nor torch)."""
    import os
    import subprocess
    import sys

    code = ("import sys; from mmalign.config import load_config; "
            f"cfg = load_config({str(RECIPES / 'ecg_text.yaml')!r}); "
            "print(sorted(type(m).__name__ for m in cfg.model.modalities.values()), "
            "'mmalign.modalities' in sys.modules, 'torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(RECIPES.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "['TextConfig', 'TimeseriesConfig'] False False"


def test_unknown_modality_kind(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run_dir: x\ndata: {train: a.tar}\nmodel:\n  modalities:\n    imgae: {}\n")
    with pytest.raises(ConfigError, match="unknown modality kind 'imgae' \\(did you mean 'image'\\?\\)"):
        load_config(recipe)


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", "train.lr must be a number > 0, got -1"),
    ("train.precision=fp8", "train.precision must be one of"),
    ("data.batch_size=many", "data.batch_size: expected an integer"),
    ("train.steps=0", "train.steps must be a number >= 1, got 0"),
])
def test_values_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RECIPES / "lit_image_text.yaml", [override])
