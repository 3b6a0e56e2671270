"""Alignment objectives: pure functions (the stable API) and registered loss modules for recipes.

Importing a module registers its objectives: objectives (clip, siglip), variants (cwcl, dcl, clip_hard_negatives,
clip_plus), multimodal (symile, gram), caption (coca), chunked (chunked_clip, chunked_siglip). ``contract`` holds
what the model and the objectives exchange (``AlignmentOutput``, ``Requirements``); ``temperature`` where the
logit scale comes from; ``regularisers`` alignment and uniformity.
"""
from .contract import AlignmentOutput, CaptionTargets, Requirements
from .pairwise import clip_loss, siglip_loss
from .registry import LOSSES, build_loss, register_loss
from .regularisers import alignment_loss, distributed_uniformity, uniformity_loss
from .temperature import TemperatureSchedule, scheduled_logit_scale, scheduled_temperature
from .objectives import Objective
from .variants import (
    cwcl_loss, cwcl_rows_loss, cwcl_weights, dcl_loss, dcl_rows_loss, hard_negative_clip_loss,
    hard_negative_clip_rows_loss, infonce_rows, label_smoothed_clip_loss, label_smoothed_clip_rows_loss,
)
from .multimodal import gram_loss, gram_volume, symile_loss
from .caption import caption_loss
from .chunked import chunked_clip_loss, chunked_siglip_loss

__all__ = [
    "AlignmentOutput", "CaptionTargets", "Requirements", "Objective",
    "clip_loss", "siglip_loss", "LOSSES", "build_loss", "register_loss",
    "TemperatureSchedule", "alignment_loss", "cwcl_loss", "cwcl_rows_loss", "cwcl_weights", "dcl_loss",
    "dcl_rows_loss", "distributed_uniformity", "hard_negative_clip_loss", "hard_negative_clip_rows_loss",
    "infonce_rows", "label_smoothed_clip_loss", "label_smoothed_clip_rows_loss", "scheduled_logit_scale",
    "scheduled_temperature", "uniformity_loss",
    "symile_loss", "gram_volume", "gram_loss", "caption_loss",
    "chunked_clip_loss", "chunked_siglip_loss",
]
