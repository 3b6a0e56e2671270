"""One registry for alignment objectives: a recipe names its loss (``loss.name``) and passes keyword arguments."""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import ConfigError, closest

LOSSES: dict[str, type[nn.Module]] = {}


def register_loss(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        LOSSES[name] = cls
        return cls

    return add


def build_loss(name: str, modalities: list[str], **kwargs) -> nn.Module:
    """Instantiate the objective ``name`` for the ordered ``modalities`` (the first is the anchor where it matters)."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}{closest(name, LOSSES)}; known: {', '.join(sorted(LOSSES))}")
    try:
        return LOSSES[name](modalities, **kwargs)
    except TypeError as e:
        raise ConfigError(f"loss {name!r}: {e}") from None
