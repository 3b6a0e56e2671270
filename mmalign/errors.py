"""User-facing errors: the CLI prints their message on one line, without a traceback."""
from __future__ import annotations

import difflib
from typing import Iterable


class MMAlignError(Exception):
    """Base class of errors caused by the user's input (config, data, paths), not by a bug."""


class ConfigError(MMAlignError):
    """A recipe, override or argument is invalid."""


class DataError(MMAlignError):
    """A data file, shard or sample cannot be used."""


def closest(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid choice, or an empty string."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""
