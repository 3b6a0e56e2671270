"""Numeric bounds of config fields, declared on the field (configs as data) and checked by one walk.

```python
image_size: Optional[int] = bounded(None, ge=1)
betas: tuple = bounded((0.9, 0.98), ge=0, lt=1, length=2)   # a tuple: every element, and how many
```

A bounded value must be a finite number within its bounds; None (unset, filled later from a tower's defaults, or
"off") is not checked. :func:`check_bounds` walks a config (nested sections, dicts of sections) and raises a
``ConfigError`` naming the first field out of range, so every size, rate and length is checked before anything runs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ConfigError

BOUNDS = "bounds"  # key of a field's metadata holding its ``Bounds``


@dataclass(frozen=True)
class Bounds:
    """``gt`` < value, ``ge`` <= value, value < ``lt``, value <= ``le`` (each optional); ``length``: a tuple's size."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    length: int | None = None

    def rule(self, many: bool = False) -> str:
        """The bounds in words: ``a number in [0, 1)``, ``a number > 0``; for a tuple (``many``) ``2 numbers in
        [0, 1)``, ``numbers > 0``."""
        low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if low and high:
            where = f" in {low}, {high}"
        elif low:
            where = f" {'>=' if self.ge is not None else '>'} {low[1:]}"
        elif high:
            where = f" {'<=' if self.le is not None else '<'} {high[:-1]}"
        else:
            where = ""
        if not many:
            return f"a number{where}" if where else "a finite number"
        return f"{self.length or 'a list of'} numbers{where}" if where or self.length else "a list of finite numbers"

    def holds(self, value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return (self.length is None or len(value) == self.length) and all(self.holds_for(v) for v in value)
        return self.length is None and self.holds_for(value)

    def holds_for(self, x: Any) -> bool:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            return False
        return ((self.gt is None or x > self.gt) and (self.ge is None or x >= self.ge)
                and (self.lt is None or x < self.lt) and (self.le is None or x <= self.le))


def bounded(default: Any = dataclasses.MISSING, *, gt: float | None = None, ge: float | None = None,
            lt: float | None = None, le: float | None = None, length: int | None = None) -> Any:
    """A dataclass field with ``default`` whose value must lie within the bounds (see :class:`Bounds`)."""
    return dataclasses.field(default=default, metadata={BOUNDS: Bounds(gt, ge, lt, le, length)})


def check_bounds(obj: Any, name: Callable[[str], str], where: str = "") -> None:
    """Raise a ``ConfigError`` for the first bounded field of ``obj`` (a config dataclass, walked with its nested
    sections and dicts of sections) whose value is out of bounds; ``name(path)`` says how the error names the field
    (e.g. ``train.lr`` in a recipe, ``--top-p`` on the command line)."""
    for f in dataclasses.fields(obj):
        value, path = getattr(obj, f.name), f"{where}.{f.name}" if where else f.name
        bounds = f.metadata.get(BOUNDS)
        if bounds is not None and value is not None and not bounds.holds(value):
            shown = list(value) if isinstance(value, (list, tuple)) else value
            raise ConfigError(f"{name(path)} must be {bounds.rule(bounds.length is not None or shown is not value)}, "
                              f"got {shown!r}")
        for key, section in (value.items() if isinstance(value, dict) else [(None, value)]):
            if dataclasses.is_dataclass(section) and not isinstance(section, type):
                check_bounds(section, name, path if key is None else f"{path}.{key}")
