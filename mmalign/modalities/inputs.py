"""A modality's collated inputs as the adapter handles them: a tensor, or a dict of tensors with one row per item,
or several rows per item with ``OWNER`` (the item of each row)."""
from __future__ import annotations

from typing import Any

import torch

from .registry import OWNER


def inputs_to(inputs: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """A modality's collated inputs (a tensor, or a dict of tensors such as token ids and masks) on ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=non_blocking)
    return {k: v.to(device, non_blocking=non_blocking) for k, v in inputs.items()}


def split_owner(inputs: Any) -> tuple[Any, torch.Tensor | None]:
    """(the inputs without ``OWNER``, ``OWNER`` or None when every row is its own item)."""
    owner = inputs.get(OWNER) if isinstance(inputs, dict) else None
    if owner is None:
        return inputs, None
    return {k: v for k, v in inputs.items() if k != OWNER}, owner


def mean_by_owner(features: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Mean of the feature rows that belong to the same item (``owner[i]`` = item of row i, items 0..n-1)."""
    n = int(owner.max()) + 1
    sums = features.new_zeros(n, features.shape[1]).index_add_(0, owner, features)
    counts = torch.bincount(owner, minlength=n).clamp(min=1).to(features.dtype)
    return sums / counts[:, None]


def select_rows(inputs: Any, index: torch.Tensor) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    return {k: v[index] for k, v in inputs.items()}


def select_items(inputs: Any, index: torch.Tensor) -> Any:
    """Items ``index`` (ascending) of collated inputs: their rows, or with ``OWNER`` their rows (renumbered)."""
    rows, owner = split_owner(inputs)
    if owner is None:
        return select_rows(inputs, index)
    keep = torch.isin(owner, index)
    renumber = torch.full((int(owner.max()) + 1,), -1, dtype=torch.long, device=owner.device)
    renumber[index] = torch.arange(len(index), device=owner.device)
    return {**{k: v[keep] for k, v in rows.items()}, OWNER: renumber[owner[keep]]}


def place_rows(values: torch.Tensor, index: torch.Tensor, present: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """B x D: row ``index[i]`` holds ``values[i]`` where ``present``; every absent row holds ``fill``."""
    placed = values.new_zeros(present.shape[0], values.shape[1]).index_copy(0, index, values)
    return torch.where(present[:, None], placed, fill.to(values.dtype))
