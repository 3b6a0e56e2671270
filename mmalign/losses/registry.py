"""One registry for alignment objectives: a recipe names its loss (``loss.name``) and passes keyword arguments."""
from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from ..errors import ConfigError, closest

LOSSES: dict[str, type[nn.Module]] = {}


def register_loss(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        LOSSES[name] = cls
        return cls

    return add


def loss_options(name: str) -> list[str]:
    """The keyword arguments the objective ``name`` takes (a recipe's ``loss.kwargs``)."""
    return [p for p in inspect.signature(LOSSES[name]).parameters if p != "modalities"]


def build_loss(name: str, modalities: list[str], **kwargs) -> nn.Module:
    """Instantiate the objective ``name`` for the ordered ``modalities`` (the first is the anchor where it matters)."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}{closest(name, LOSSES)}; known: {', '.join(sorted(LOSSES))}")
    options = loss_options(name)
    for key in kwargs:
        if key not in options:
            raise ConfigError(f"loss {name!r} takes no option {key!r}{closest(key, options)}; "
                              f"its options: {', '.join(options) or 'none'}")
    try:
        return LOSSES[name](modalities, **kwargs)
    except TypeError as e:
        raise ConfigError(f"loss {name!r}: {e}") from None
