"""Modality adapters: one file per modality kind, each registering its kind (decoder, transforms) and its towers.

``registry`` holds the interface and the registries, ``adapter`` the module that turns any tower into embeddings;
``tuning`` (locking, LoRA), ``frozen_cache``, ``coca`` (caption heads) and ``inputs`` serve the adapter. Importing this
package registers the built-in kinds and towers.
"""
from . import audio, image, text, timeseries, timeseries_towers  # noqa: F401  (register the built-in kinds and towers)
from .adapter import ModalityAdapter
from .inputs import inputs_to
from .registry import MODALITIES, TOWERS, Modality, TowerSpec, build_modality, register_modality, register_tower
from .tuning import NORM_TYPES, merge_lora

__all__ = ["MODALITIES", "NORM_TYPES", "TOWERS", "Modality", "ModalityAdapter", "TowerSpec", "build_modality",
           "inputs_to", "merge_lora", "register_modality", "register_tower"]
