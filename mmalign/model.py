"""AlignmentModel: one adapter per modality, a learnable logit scale (and SigLIP bias), save/load with safetensors.

A captioning model (CoCa, ``model.caption``) also has a caption decoder: the text modality's tower, whose
cross-attending half reads a context pooled from the captioned modality's tower tokens (``ModalityAdapter``).
"""
from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any, Collection, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from .config import GenerationConfig, ModelConfig, from_dict, to_dict
from .distributed import sum_over_ranks
from .errors import ConfigError, MMAlignError
from .heads.generation import generate
from .io import atomic_dir, write_json
from .losses.caption import caption_targets
from .losses.contract import AlignmentOutput
from .modalities import Modality, ModalityAdapter, build_modality, merge_lora
from .modalities.tuning import tower_blocks

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
        self.adapters = nn.ModuleDict(build_adapters(config, self.modalities))
        ls = config.logit_scale
        init = ls.init if ls.init is not None else (10.0 if config.logit_bias else 1 / 0.07)
        learned = ls.learnable and ls.schedule is None  # a scheduled scale comes from the loop (TemperatureSchedule)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(init)), requires_grad=learned)
        if config.logit_bias:
            self.logit_bias = nn.Parameter(torch.tensor(ls.bias_init if ls.bias_init is not None else -10.0))
        else:
            self.logit_bias = None

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    @property
    def _no_split_modules(self) -> list[str]:
        """Class names of the towers' blocks (``tuning.tower_blocks``; generic containers left out): the units that
        FSDP shards. Accelerate's transformer-based wrap policy reads this, as it does for a transformers model."""
        names = {type(block).__name__ for adapter in self.adapters.values()
                 for block in (tower_blocks(adapter.tower) or ())}
        return sorted(names - {"Sequential", "ModuleList"})

    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        self.log_logit_scale.clamp_(max=math.log(self.config.logit_scale.max))

    def encode(self, name: str, inputs: Any, present: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised embeddings of one modality; rows flagged absent in ``present`` get its missing embedding."""
        if name not in self.adapters:
            raise ConfigError(f"model has no modality {name!r}; it has {', '.join(self.adapters)}")
        return self.adapters[name](inputs, present=present)

    def forward(self, batch: dict[str, Any], features: Collection[str] = ()) -> AlignmentOutput:
        """Normalised embeddings for every modality of the model that the batch carries, as one ``AlignmentOutput``.

        Presence masks in the batch (``<name>__present``) give absent items the modality's learned missing
        embedding; the output carries the masks of the optional modalities. The towers of the modalities named in
        ``features`` also give their outputs before projection, from the same pass, as ``frozen_features`` (e.g. a
        frozen text tower's features for CWCL's soft targets; a locked tower computes them without gradient, from
        its cache when enabled). For a captioning model whose batch carries both the captioned modality and the
        text, both embeddings come from the passes that give the caption logits and targets (``caption``).
        """
        cap = self.config.caption
        pair = (cap.context, cap.text) if cap is not None and cap.context in batch and cap.text in batch else ()
        embeddings, frozen = {}, {}
        for name, adapter in self.adapters.items():
            if name not in batch or name in pair:
                continue
            present = batch.get(f"{name}__present")
            if name in features:
                embeddings[name], frozen[name] = adapter(batch[name], return_features=True, present=present)
            else:
                embeddings[name] = adapter(batch[name], present=present)
        caption = None
        if pair:
            embeddings[cap.context], context = self.adapters[cap.context].embed_with_context(batch[cap.context])
            text = batch[cap.text]
            embeddings[cap.text], logits = self.adapters[cap.text].caption(text, context)
            caption = caption_targets(logits, text["input_ids"], text["attention_mask"])
        return AlignmentOutput(embeddings, self.presence(batch), frozen, caption)

    @torch.no_grad()
    def generate_captions(self, inputs: Any, generation: GenerationConfig | None = None,
                          generator: torch.Generator | None = None) -> list[str]:
        """Captions for a batch of the captioned modality's inputs (``model.caption.context``).

        ``generation`` picks the strategy and its options (default: greedy); sampling draws from ``generator``
        (default: one seeded with ``generation.seed``).
        """
        cap = self.config.caption
        if cap is None:
            raise ConfigError("this model has no caption decoder (model.caption is not set)")
        gen = generation or GenerationConfig()
        text = self.modalities[cap.text]
        limit = text.max_length - 1  # BOS + generated tokens must fit the decoder's positions
        max_length = gen.max_length or limit
        if max_length > limit:
            raise ConfigError(f"max_length {max_length} is more than the decoder can place after BOS ({limit})")
        _, context = self.adapters[cap.context].embed_with_context(inputs)
        if gen.strategy == "sample" and generator is None:
            generator = torch.Generator(device=context.device).manual_seed(gen.seed)
        tok = text.tokenizer
        ids = generate(
            self.adapters[cap.text].tower.step, context, tok.bos_id, tok.eos_id, tok.pad_id, max_length,
            min_length=gen.min_length, strategy=gen.strategy, num_beams=gen.num_beams, top_k=gen.top_k,
            top_p=gen.top_p, temperature=gen.temperature, repetition_penalty=gen.repetition_penalty,
            no_repeat_ngram_size=gen.no_repeat_ngram_size, generator=generator, length_penalty=gen.length_penalty,
        )
        return tok.decode(ids)

    def presence(self, batch: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """The batch's presence masks of the optional modalities (``AlignmentOutput.present``).

        None when no modality is optional; which masks are returned depends only on the model, never on the
        batch, so every process makes the same collective calls in the loss.
        """
        optional = [name for name, m in self.config.modalities.items() if m.optional]
        return {name: batch[f"{name}__present"] for name in optional} if optional else None

    def merge_lora(self) -> "AlignmentModel":
        """Fold every tower's LoRA adapters into its weights (same embeddings, plain modules); returns self."""
        for name, adapter in self.adapters.items():
            if self.config.modalities[name].lora is not None:
                adapter.tower = merge_lora(adapter.tower)
                self.config.modalities[name].lora = None
        return self

    # ------------------------------------------------------------------------------------------- save / load

    def frozen_towers(self) -> list[str]:
        """The modalities whose tower never changes in training (fully locked: no trainable layer, norm or LoRA)."""
        return [name for name, adapter in self.adapters.items() if adapter.fully_locked]

    def weights(self, skip_towers: Collection[str] = ()) -> dict[str, torch.Tensor]:
        """The tensors ``model.safetensors`` holds: the state dict without the towers of ``skip_towers``; a storage
        shared by several names (tied weights) is kept once, under its first name, as ``safetensors`` needs."""
        skip = tuple(f"adapters.{name}.tower." for name in skip_towers)
        kept, seen = {}, set()
        for key, tensor in self.state_dict().items():
            ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride())
            if not key.startswith(skip) and ident not in seen:
                kept[key] = tensor.contiguous()
            seen.add(ident)
        return kept

    def save_tower(self, name: str, path: str | Path) -> None:
        """The weights of modality ``name``'s tower alone, as safetensors (``load_weights(..., towers=)`` reads them)."""
        save_model(self.adapters[name].tower, str(path))

    def save_pretrained(self, directory: str | Path, skip_towers: Collection[str] = (),
                        metadata: dict[str, str] | None = None) -> None:
        """Write ``config.json`` + ``model.safetensors`` (+ tokenizer/tower configs per modality), atomically;
        ``metadata`` goes into the safetensors header (e.g. the training step the weights are from).

        The weights of the towers in ``skip_towers`` are left out (a run's checkpoints store frozen towers once,
        ``mmalign.rundir``): loading such a folder needs them from their own files (``from_pretrained(towers=)``).
        """
        with atomic_dir(directory) as tmp:
            saved = copy.deepcopy(self.config)
            for name, modality in self.modalities.items():
                updates = modality.save_assets(self.adapters[name].tower, tmp / name)
                for key, value in updates.items():
                    setattr(saved.modalities[name], key, value)
            write_json(tmp / CONFIG_NAME, to_dict(saved))
            save_file(self.weights(skip_towers), str(tmp / WEIGHTS_NAME), metadata=metadata)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu",
                        towers: Mapping[str, str | Path] | None = None) -> "AlignmentModel":
        """The model saved in ``directory``; ``towers`` names the files of towers its weights leave out."""
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
            raise ConfigError(f"{directory}: not a saved mmalign model (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        try:
            config = from_dict(ModelConfig, json.loads((directory / CONFIG_NAME).read_text()))
        except ValueError as e:
            raise ConfigError(f"{directory / CONFIG_NAME}: not valid JSON ({e})") from None
        for m in config.modalities.values():
            m.init = "scratch"  # every weight comes from model.safetensors
            m.pretrained = None
            for key in ("model", "tokenizer"):  # assets saved inside the model folder
                value = getattr(m, key, None)
                if value and value.startswith("./"):
                    setattr(m, key, str(directory / value[2:]))
        model = cls(config)
        model.load_weights(directory / WEIGHTS_NAME, towers or {}, device=map_location)
        return model

    def load_weights(self, path: str | Path, towers: Mapping[str, str | Path] | None = None,
                     device: str = "cpu") -> None:
        """Load ``model.safetensors`` at ``path`` and the towers it leaves out, each from its file in ``towers``
        (``save_tower``). A file that cannot be read or does not fit this model raises ``ConfigError``."""
        towers = dict(towers or {})
        try:
            missing, unexpected = load_model(self, str(path), strict=False, device=device)
            for name, file in towers.items():
                load_model(self.adapters[name].tower, str(file), device=device)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ConfigError(f"cannot load weights from {path}: {str(e).splitlines()[0]}") from None
        missing = [k for k in missing if not k.startswith(tuple(f"adapters.{n}.tower." for n in towers))]
        if missing or unexpected:
            raise ConfigError(f"{path} does not fit the model of its {CONFIG_NAME}: "
                              f"missing {missing[:3]}, unexpected {list(unexpected)[:3]}")


def build_adapters(config: ModelConfig, modalities: dict[str, Modality]) -> dict[str, ModalityAdapter]:
    """One adapter per modality, in config order; with ``config.caption`` the text adapter's tower is a caption
    decoder and the captioned modality's adapter gets a CoCa head producing a context as wide as the decoder's."""
    cap = config.caption
    adapters: dict[str, ModalityAdapter] = {}
    coca = None
    if cap is not None:
        adapters[cap.text] = ModalityAdapter(modalities[cap.text], config.embed_dim)
        decoder = adapters[cap.text].tower
        if not hasattr(decoder, "caption"):
            raise ConfigError(f"model.caption.text: modality {cap.text!r} needs a caption decoder tower "
                              f"(tower: coca_decoder), not {modalities[cap.text].cfg.tower!r}")
        coca = {"context_dim": decoder.context_dim, "n_queries": cap.n_queries, "n_heads": cap.heads}
    for name, modality in modalities.items():
        if name not in adapters:
            adapters[name] = ModalityAdapter(modality, config.embed_dim,
                                             coca=coca if cap is not None and name == cap.context else None)
        if hasattr(adapters[name].tower, "caption") and (cap is None or name != cap.text):
            raise ConfigError(f"modality {name!r}: a caption decoder tower needs model.caption "
                              f"(context: the modality to caption, text: {name})")
    return {name: adapters[name] for name in modalities}


def parameters_without_gradient(model: AlignmentModel) -> dict[str, list[str]]:
    """Parameters that require grad but got no gradient in the backward passes since ``.grad`` was last cleared,
    by where they live: ``"<modality> tower (<tower>)"``, ``"<modality> head"`` or ``"model"``."""
    found: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is None:
            parts = name.split(".")
            if parts[0] == "adapters" and len(parts) > 2:
                cfg = model.config.modalities[parts[1]]
                where = f"{parts[1]} tower ({cfg.tower})" if parts[2] == "tower" else f"{parts[1]} head"
            else:
                where = "model"
            found.setdefault(where, []).append(name)
    return found


def check_gradients(model: AlignmentModel, device: torch.device | str = "cpu") -> None:
    """After the first backward pass of a run, on every process: stop, with one line naming them, when trainable
    parameters got no gradient. DistributedDataParallel would otherwise stop at the next step with "Expected to have
    finished reduction in the prior iteration"; on one process they would silently never train."""
    missing = parameters_without_gradient(model)
    if not sum_over_ranks([len(missing)], device)[0]:
        return
    listed = "; ".join(f"{where}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                       for where, names in missing.items()) or "on another process"
    raise MMAlignError(f"trainable parameters got no gradient in the first step ({listed}): a tower must use every "
                       f"parameter it trains (freeze or remove the others; several processes fail on them)")
