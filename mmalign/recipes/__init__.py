"""The recipes that ship with mmalign: one YAML per use, read from the installed package (importlib.resources).

``mmalign recipes`` lists them, ``mmalign recipes show NAME > my.yaml`` prints one to start from, and
``mmalign train NAME`` (or ``mmalign demo``) trains one. A recipe's leading comment says what it is for; its first
sentence is the one-line summary in the listing.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import yaml

from ..config import Config, load_config
from ..errors import ConfigError, closest

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

SUFFIX = ".yaml"
# The end of a sentence: a full stop after a word or a closing bracket, then a space and a capital letter or code
# (so "Zhai et al. 2022" stays whole).
SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]])\.\s+(?=[A-Z`])")


def shipped() -> Traversable:
    """The folder of shipped recipes (and the findings the comparison demos fill in)."""
    return resources.files(__name__)


def names() -> list[str]:
    """Names of the shipped recipes (file names without ``.yaml``), sorted."""
    return sorted(f.name[:-len(SUFFIX)] for f in shipped().iterdir() if f.name.endswith(SUFFIX))


def resource(name: str) -> Traversable:
    """A shipped recipe by name (``lit_image_text`` or ``lit_image_text.yaml``), or a file beside the recipes
    (``cwcl.findings.md``); an unknown name is a ``ConfigError`` listing the recipes."""
    file = shipped() / (name if name.endswith((SUFFIX, ".md")) else name + SUFFIX)
    if not file.is_file():
        stem = name.removesuffix(SUFFIX)
        raise ConfigError(f"no shipped recipe named {stem!r}{closest(stem, names())}; recipes: {', '.join(names())}")
    return file


def text(name: str) -> str:
    """A shipped recipe's YAML, comments included (``mmalign recipes show NAME``)."""
    return resource(name).read_text()


def load(name: str, overrides: list[str] | None = None) -> Config:
    """A shipped recipe, with ``overrides`` (``key=value``) applied, as a validated ``Config``."""
    with resources.as_file(resource(name)) as path:
        return load_config(path, overrides)


@contextmanager
def recipe_file(recipe: str | Path) -> Iterator[Path]:
    """The recipe ``mmalign train`` was given: an existing file is used as is; a bare name (no folder) is a shipped
    recipe. Yields a path ``load_config`` reads."""
    path = Path(recipe)
    if path.is_file():
        yield path
        return
    stem = path.name.removesuffix(SUFFIX)
    if path.parent != Path(".") or stem not in names():
        raise ConfigError(f"recipe not found: {recipe}: no such file, and no shipped recipe of that name"
                          f"{closest(stem, names())}; shipped recipes: {', '.join(names())}")
    with resources.as_file(resource(stem)) as file:
        yield file


def summary(yaml_text: str) -> str:
    """The first sentence of a recipe's leading comment block."""
    lines = []
    for line in yaml_text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    comment = " ".join(line for line in lines if line)
    return SENTENCE_END.split(comment, maxsplit=1)[0].rstrip(".") if comment else ""


def listing() -> str:
    """One line per shipped recipe: name, objective, modalities and the summary (``mmalign recipes``)."""
    rows = []
    for name in names():
        source = text(name)
        recipe = yaml.safe_load(source) or {}
        modalities = "+".join((recipe.get("model") or {}).get("modalities") or {})
        rows.append((name, (recipe.get("loss") or {}).get("name", "clip"), modalities, summary(source)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows)
