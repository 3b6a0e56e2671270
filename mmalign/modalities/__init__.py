"""Modality adapters: one file per modality kind, each registering its config, decoder, transforms and towers."""
from .base import (
    MODALITIES, NORM_TYPES, Modality, ModalityAdapter, build_modality, inputs_to, merge_lora, register_modality,
    register_tower,
)
from . import audio, image, text, timeseries  # noqa: F401  (register the built-in kinds)

__all__ = ["MODALITIES", "NORM_TYPES", "Modality", "ModalityAdapter", "build_modality", "inputs_to", "merge_lora",
           "register_modality", "register_tower"]
