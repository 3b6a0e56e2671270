"""Modality adapters: one file per modality kind, each registering its config, decoder, transforms and towers."""
from .base import (NORM_TYPES, MODALITIES, Modality, ModalityAdapter, build_modality, inputs_to, merge_lora,
                   register_modality, register_tower)
from . import audio, image, text, timeseries  # noqa: F401  (register the built-in kinds)

__all__ = ["MODALITIES", "Modality", "ModalityAdapter", "NORM_TYPES", "build_modality", "inputs_to", "merge_lora",
           "register_modality", "register_tower"]
