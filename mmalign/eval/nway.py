"""N-way scoring: how well a tuple of given modalities (e.g. ECG and image) matches a candidate of another (a report).

Pure functions of L2-normalised embeddings. ``given[m]`` is Q x D (row q of every given modality belongs to query
tuple q), ``candidates`` is C x D; every score function returns Q x C, higher = better match. Each objective trains
one of these scores (``Requirements.nway_score``), which a trained model records as ``model.config.nway_score``:

- ``mip`` (Symile): multilinear inner product sum_d g1_d g2_d ... c_d, i.e. (g1 * g2 * ...) . c.
- ``volume`` (GRAM): minus the volume of the parallelotope spanned by (g1, g2, ..., c), sqrt(det(X X^T) + eps).
- ``cosine`` (pairwise objectives such as CLIP): sum of cosines sum_m g_m . c.

With one given modality ``mip`` and ``cosine`` are the usual cosine similarity; ``volume`` is -|sin(angle)|.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import ConfigError, closest
from ..losses import gram_volume

NwayScore = Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]
NWAY_SCORES: dict[str, NwayScore] = {}


def register_nway_score(name: str) -> Callable[[NwayScore], NwayScore]:
    def add(fn: NwayScore) -> NwayScore:
        NWAY_SCORES[name] = fn
        return fn

    return add


@register_nway_score("mip")
def mip_scores(given: list[torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:
    """Symile's multilinear inner product of each query tuple with each candidate."""
    return torch.stack(given).prod(dim=0) @ candidates.T


@register_nway_score("volume")
def volume_scores(given: list[torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:
    """GRAM: minus the Gram volume of (candidate, given tuple); the volume is symmetric in the vectors' order."""
    return -gram_volume(candidates, given).T


@register_nway_score("cosine")
def cosine_sum_scores(given: list[torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:
    """Pairwise baseline: the sum over given modalities of their cosine with the candidate."""
    return torch.stack(given).sum(dim=0) @ candidates.T


def nway_scores(given: dict[str, torch.Tensor], candidates: torch.Tensor, method: str) -> torch.Tensor:
    """Q x C scores of the query tuples ``given`` (name -> Q x D) against ``candidates`` (C x D) by ``method``."""
    if method not in NWAY_SCORES:
        raise ConfigError(f"unknown N-way score {method!r}{closest(method, NWAY_SCORES)}; "
                          f"known: {', '.join(sorted(NWAY_SCORES))}")
    if not given:
        raise ValueError("nway_scores needs at least one given modality")
    rows = {x.shape[0] for x in given.values()}
    if len(rows) != 1:
        raise ValueError(f"given modalities must have one row per query tuple, got {[tuple(x.shape) for x in given.values()]}")
    return NWAY_SCORES[method]([x.float() for x in given.values()], candidates.float())
