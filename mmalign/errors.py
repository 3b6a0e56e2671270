"""User-facing errors: the CLI prints their message on one line, without a traceback."""
from __future__ import annotations

import difflib
from typing import Iterable


class MMAlignError(Exception):
    """Base class of errors caused by the user's input (config, data, paths) or the machine (a full disk), not by a
    bug: the CLI prints ``mmalign: <label>: <message>`` and exits with ``exit_code``."""

    label = "error"
    exit_code = 2


class ConfigError(MMAlignError):
    """A recipe, override or argument is invalid."""


class DataError(MMAlignError):
    """A data file, shard or sample cannot be used."""


class RunStopped(MMAlignError):
    """Training stopped on request (SIGTERM, SIGUSR1, Ctrl-C) after writing a checkpoint: re-running the same command
    resumes. Its exit code, 75 (``EX_TEMPFAIL``: try again later), tells a job script to requeue."""

    label = "stopped"
    exit_code = 75


def closest(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid choice, or an empty string."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""
