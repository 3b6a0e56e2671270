"""Temperature schedules: where the loss's logit scale comes from at each step (learned, fixed or scheduled)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError

KINDS = ("cosine", "linear", "exponential", "constant")


def scheduled_temperature(step: int, total_steps: int, start: float, end: float, kind: str = "cosine") -> float:
    """Temperature tau at ``step`` going from ``start`` (step 0) to ``end`` (step >= ``total_steps``).

    cosine: end + (start - end) (1 + cos(pi p)) / 2; linear: start + (end - start) p; exponential: start (end/start)^p
    (linear in log tau); constant: start. p = clamp(step / total_steps, 0, 1).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown temperature schedule {kind!r}; known: {', '.join(KINDS)}")
    if total_steps <= 0 or start <= 0 or end <= 0:
        raise ConfigError(f"temperature schedule needs total_steps > 0 and temperatures > 0, got "
                          f"total_steps={total_steps}, start={start}, end={end}")
    p = min(max(step / total_steps, 0.0), 1.0)
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
    if kind == "linear":
        return start + (end - start) * p
    if kind == "exponential":
        return start * (end / start) ** p
    return start


def scheduled_logit_scale(step: int, total_steps: int, start: float, end: float, kind: str = "cosine") -> float:
    """Logit scale s = 1 / tau for :func:`scheduled_temperature` (``start``/``end`` are temperatures, e.g. 0.07)."""
    return 1.0 / scheduled_temperature(step, total_steps, start, end, kind)


@dataclass(frozen=True)
class TemperatureSchedule:
    """Where the loss's logit scale comes from at each step.

    ``mode="learnable"``: the model's learnable scale (log-parametrised, init ln(1/0.07), clamped at 100 by the
    model), passed through unchanged. ``"fixed"``: s = 1/tau_start. ``"scheduled"``: s = 1/tau(step) from
    :func:`scheduled_temperature` (tau_start -> tau_end over total_steps, ``kind``).
    """

    mode: str = "learnable"
    tau_start: float = 0.07
    tau_end: float = 0.01
    total_steps: int = 1
    kind: str = "cosine"

    def __post_init__(self) -> None:
        if self.mode not in ("learnable", "fixed", "scheduled"):
            raise ConfigError(f"temperature mode must be learnable, fixed or scheduled, got {self.mode!r}")
        if self.mode == "scheduled":
            scheduled_temperature(0, self.total_steps, self.tau_start, self.tau_end, self.kind)  # validates
        elif self.tau_start <= 0:
            raise ConfigError(f"tau_start must be > 0, got {self.tau_start}")

    @property
    def learnable(self) -> bool:
        """Whether the model's logit-scale parameter should receive gradients."""
        return self.mode == "learnable"

    def logit_scale(self, step: int, learned: torch.Tensor | None = None) -> torch.Tensor | float:
        """The logit scale to pass to the loss at ``step`` (a tensor like ``learned`` when it is given)."""
        if self.mode == "learnable":
            if learned is None:
                raise ValueError("learnable temperature: pass the model's logit scale as learned=")
            return learned
        if self.mode == "fixed":
            s = 1.0 / self.tau_start
        else:
            s = scheduled_logit_scale(step, self.total_steps, self.tau_start, self.tau_end, self.kind)
        return s if learned is None else torch.tensor(s, dtype=learned.dtype, device=learned.device)
