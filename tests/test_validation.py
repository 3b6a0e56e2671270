"""Validation before work: every bounded config field, and tower_kwargs against the tower's signature."""

import typing

import pytest

from mmalign.bounds import Bounds, check_bounds
from mmalign.config import Config, load_config
from mmalign.errors import ConfigError
from mmalign.modality_config import MODALITY_CONFIGS
from mmalign.modalities.registry import check_kwargs
from conftest import bounded_fields

RECIPE = "recipes/lit_image_text.yaml"


def out_of_bounds(b: Bounds):
    """A value just outside the bounds (a number), or a wrong length."""
    if b.ge is not None:
        value = b.ge - 1
    elif b.gt is not None:
        value = b.gt
    elif b.le is not None:
        value = b.le + 1
    elif b.lt is not None:
        value = b.lt
    else:
        value = float("nan")
    return [value] * b.length if b.length else value


def test_bounds_in_words():
    assert Bounds(ge=0, lt=1, length=2).rule(many=True) == "2 numbers in [0, 1)"
    assert Bounds(gt=0).rule() == "a number > 0"
    assert Bounds(ge=0, le=1).rule() == "a number in [0, 1]"
    assert Bounds().rule() == "a finite number"
    assert not Bounds(gt=0).holds(True) and not Bounds(gt=0).holds(float("inf")) and Bounds(gt=0).holds(3)
    assert not Bounds(ge=0, length=2).holds([1, 2, 3]) and Bounds(ge=0, length=2).holds((1, 2))


def test_every_size_rate_and_length_key_is_bounded():
    """The keys that name a size, rate, length or count carry bounds (so none reaches a DataLoader worker)."""
    keys = {k for k, _ in bounded_fields(Config)}
    for cls in MODALITY_CONFIGS.values():
        keys |= {f"modality.{k}" for k, _ in bounded_fields(cls)}
    for key in ("model.embed_dim", "data.batch_size", "train.steps", "train.lr", "eval.batch_size",
                "modality.image_size", "modality.max_length", "modality.sample_rate", "modality.clip_seconds",
                "modality.n_mels", "modality.hop_length", "modality.window_s", "modality.lora.r"):
        assert key in keys, key


@pytest.mark.parametrize("key, bounds", bounded_fields(Config), ids=lambda x: x if isinstance(x, str) else "")
def test_each_recipe_bound_is_one_error_naming_the_key(key, bounds):
    sections = {"model.logit_scale.schedule": "{}", "model.caption": "{context: image}"}  # optional sections, set
    present = [f"{s}={v}" for s, v in sections.items() if key.startswith(s + ".")]
    with pytest.raises(ConfigError, match=rf"lit_image_text.yaml: {key} must be .*, got "):
        load_config(RECIPE, present + [f"{key}={out_of_bounds(bounds)}"])


@pytest.mark.parametrize("kind", sorted(MODALITY_CONFIGS))
def test_each_modality_bound_is_one_error(kind):
    for key, bounds in bounded_fields(MODALITY_CONFIGS[kind]):
        cfg = MODALITY_CONFIGS[kind](kind=kind)
        *sections, last = key.split(".")
        node = cfg
        for s in sections:
            if getattr(node, s) is None:  # an optional section (lora): set it
                setattr(node, s, typing.get_type_hints(type(node))[s].__args__[0]())
            node = getattr(node, s)
        setattr(node, last, out_of_bounds(bounds))
        with pytest.raises(ConfigError, match=rf"^modality 'm': {key} must be "):
            check_bounds(cfg, lambda k: f"modality 'm': {k}")


def build_image(**kwargs):
    from mmalign.modalities import build_modality
    from mmalign.modality_config import ImageConfig

    return build_modality("image", ImageConfig(kind="image", tower="small_cnn", tower_kwargs=kwargs))


def test_tower_kwargs_typo_suggests_the_closest_name():
    with pytest.raises(ConfigError, match=r"^modality 'image': small_cnn tower_kwargs: unknown key 'detph' \(did you "
                                          r"mean 'depth'\?\); the tower takes width, depth, in_channels, norm$"):
        build_image(width=16, detph=4)


def test_tower_kwargs_types_follow_the_annotations():
    with pytest.raises(ConfigError, match=r"small_cnn tower_kwargs.width must be an integer, got 'wide'"):
        build_image(width="wide")
    build_image(width=8, depth=2, norm="group")  # valid keys pass

    def library_tower(channels: int, **kwargs):
        pass

    def own_tower(channels: int, width: float = 1.0, sizes: tuple = (1,)):
        pass

    check_kwargs(library_tower, {"anything": 1}, "t")  # **kwargs: the library checks them as it builds
    check_kwargs(own_tower, {"width": 2, "sizes": [1, 2]}, "t")  # an int is a number, a list a tuple
    with pytest.raises(ConfigError, match="unknown key 'channels'"):  # filled by the builder, not a recipe key
        check_kwargs(own_tower, {"channels": 3}, "t")
    with pytest.raises(ConfigError, match=r"t.width must be a number, got True"):
        check_kwargs(own_tower, {"width": True}, "t")
