"""Alignment objectives: pure functions (the stable API) and registered loss modules for recipes."""
from .pairwise import clip_loss, siglip_loss
from .registry import LOSSES, build_loss, register_loss
from . import objectives  # noqa: F401  (registers the built-in objectives)

__all__ = ["clip_loss", "siglip_loss", "LOSSES", "build_loss", "register_loss"]
from .variants import (  # noqa: E402  (also registers cwcl, dcl, clip_hard_negatives, clip_plus)
    TemperatureSchedule, alignment_loss, cwcl_loss, cwcl_rows_loss, cwcl_weights, dcl_loss, dcl_rows_loss,
    distributed_uniformity, hard_negative_clip_loss, hard_negative_clip_rows_loss, infonce_rows,
    label_smoothed_clip_loss, label_smoothed_clip_rows_loss, scheduled_logit_scale, scheduled_temperature,
    uniformity_loss,
)

__all__ += [
    "TemperatureSchedule", "alignment_loss", "cwcl_loss", "cwcl_rows_loss", "cwcl_weights", "dcl_loss",
    "dcl_rows_loss", "distributed_uniformity", "hard_negative_clip_loss", "hard_negative_clip_rows_loss",
    "infonce_rows", "label_smoothed_clip_loss", "label_smoothed_clip_rows_loss", "scheduled_logit_scale",
    "scheduled_temperature", "uniformity_loss",
]
