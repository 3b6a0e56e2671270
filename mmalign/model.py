"""AlignmentModel: one adapter per modality, a learnable logit scale (and SigLIP bias), save/load with safetensors."""
from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from .config import ModelConfig, from_dict, to_dict
from .errors import ConfigError
from .io import atomic_dir, write_json
from .modalities import Modality, ModalityAdapter, build_modality

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class AlignmentModel(nn.Module):
    """A dict of modality adapters projecting into one L2-normalised space.

    ``logit_scale`` is learned as its log (init ln(1/0.07) as in CLIP, or ln 10 with a bias of -10 for SigLIP) and
    kept at most ``logit_scale.max`` by ``clamp_logit_scale_`` after each optimiser step.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.modalities: dict[str, Modality] = {
            name: build_modality(name, cfg) for name, cfg in config.modalities.items()
        }
        self.adapters = nn.ModuleDict(
            {name: ModalityAdapter(m, config.embed_dim) for name, m in self.modalities.items()}
        )
        ls = config.logit_scale
        init = ls.init if ls.init is not None else (10.0 if config.logit_bias else 1 / 0.07)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(init)), requires_grad=ls.learnable)
        if config.logit_bias:
            self.logit_bias = nn.Parameter(torch.tensor(ls.bias_init if ls.bias_init is not None else -10.0))
        else:
            self.logit_bias = None

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        self.log_logit_scale.clamp_(max=math.log(self.config.logit_scale.max))

    def encode(self, name: str, inputs: Any, present: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised embeddings of one modality; rows flagged absent in ``present`` get its missing embedding."""
        if name not in self.adapters:
            raise ConfigError(f"model has no modality {name!r}; it has {', '.join(self.adapters)}")
        return self.adapters[name](inputs, present)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Normalised embeddings for every modality of the model that the batch carries (presence masks applied)."""
        return {name: adapter(batch[name], batch.get(f"{name}__present"))
                for name, adapter in self.adapters.items() if name in batch}

    def presence(self, batch: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """The batch's presence masks of the optional modalities (what the objectives take as ``present=``).

        None when no modality is optional; which masks are returned depends only on the model, never on the
        batch, so every process makes the same collective calls in the loss.
        """
        optional = [name for name, m in self.config.modalities.items() if m.optional]
        return {name: batch[f"{name}__present"] for name in optional} if optional else None

    # ------------------------------------------------------------------------------------------- save / load

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` + ``model.safetensors`` (+ tokenizer/tower configs per modality), atomically."""
        with atomic_dir(directory) as tmp:
            saved = copy.deepcopy(self.config)
            for name, modality in self.modalities.items():
                updates = modality.save_assets(self.adapters[name].tower, tmp / name)
                for key, value in updates.items():
                    setattr(saved.modalities[name], key, value)
            write_json(tmp / CONFIG_NAME, to_dict(saved))
            save_model(self, str(tmp / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> "AlignmentModel":
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
            raise ConfigError(f"{directory}: not a saved mmalign model (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        config = from_dict(ModelConfig, json.loads((directory / CONFIG_NAME).read_text()))
        for m in config.modalities.values():
            m.init = "scratch"  # every weight comes from model.safetensors
            m.pretrained = None
            if m.model and m.model.startswith("./"):
                m.model = str(directory / m.model[2:])
        model = cls(config)
        load_model(model, str(directory / WEIGHTS_NAME), device=map_location)
        return model
