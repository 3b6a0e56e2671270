"""Text modality: captions from ``txt``/``json`` members, tokenisers, and towers (any HF encoder, open_clip text).

A ``txt`` member holds one caption per non-empty line; a ``json`` member holds a string, a list of strings, or an
object with ``captions``/``caption``/``text``. Training picks one caption at random per sample; evaluation keeps all of them.
"""
from __future__ import annotations

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
from .base import Modality, create_open_clip, model_and_weights, register_modality, register_tower
from .hf import hf_dual_tower, resolve_pretrained

log = logging.getLogger(__name__)


@dataclass
class TextConfig(ModalityConfig):
    max_length: int | None = None  # tokens per caption; default: the tower's limit (hf_clip, open_clip) or 77
    padding: str | None = None  # "longest" (in the batch) | "max_length" (SigLIP pools the last position)
    long_text: str = "truncate"  # "truncate" | "windows": HF towers encode overlapping windows and average them
    window_overlap: int = 16  # tokens shared by consecutive windows (long_text: windows)
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
        except (ValueError, RecursionError) as e:  # also too-long integers and too-deep nesting
            raise DataError(f"text json is invalid: {type(e).__name__}: {e}") from None
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
    defaults = {"max_length": 77, "padding": "longest"}

    def __init__(self, name: str, cfg: TextConfig):
        super().__init__(name, cfg)
        if cfg.pooling not in ("mean", "cls"):
            raise ConfigError(f"modality {name!r}: pooling must be mean or cls, got {cfg.pooling!r}")
        if cfg.tower == "hf" and not cfg.model:
            raise ConfigError(f"modality {name!r}: text tower hf needs 'model' (a hub name or local folder)")
        if cfg.padding not in (None, "longest", "max_length"):
            raise ConfigError(f"modality {name!r}: padding must be longest or max_length, got {cfg.padding!r}")
        if cfg.long_text not in ("truncate", "windows"):
            raise ConfigError(f"modality {name!r}: long_text must be truncate or windows, got {cfg.long_text!r}")
        if cfg.long_text == "windows" and cfg.tower == "open_clip":
            raise ConfigError(f"modality {name!r}: long_text: windows needs an HF tokenizer (tower hf or hf_clip)")
        self._tokenizer = None
        self.truncated = 0
        self.seen = 0

    def decode(self, data: bytes, ext: str) -> list[str]:
        return parse_captions(data, ext)

    def transform(self, item: list[str], train: bool) -> str | list[str]:
        """Training: one caption at random. Evaluation: every caption (retrieval counts each as a positive)."""
        return random.choice(item) if train else item

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            cfg = self.cfg
            if cfg.tower == "open_clip":
                import open_clip

                self._tokenizer = open_clip.get_tokenizer(cfg.tokenizer or cfg.model, context_length=self.max_length)
            else:
                from transformers import AutoTokenizer

                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
                self._tokenizer = AutoTokenizer.from_pretrained(
                    resolve_pretrained(cfg.tokenizer or cfg.model), trust_remote_code=cfg.trust_remote_code
                )
        return self._tokenizer

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    @property
    def max_length(self) -> int:
        return self.cfg.max_length or self.defaults["max_length"]

    def collate(self, items: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenize(items)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, truncated to ``max_length``; truncations are counted and reported.

        With ``long_text: windows`` a long caption becomes several rows (windows of ``max_length`` tokens sharing
        ``window_overlap`` tokens) and ``window_owner`` says which caption each row belongs to; the adapter
        averages the windows' features.
        """
        L = self.max_length
        if self.cfg.tower == "open_clip":
            tok = self.tokenizer
            lengths = [len(tok.encode(t)) + 2 for t in texts]
            ids = tok(texts)
            batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
            self._count_truncations(sum(n > L for n in lengths), len(texts))
            return batch
        # One pass: overflowing tokens come back as extra rows, which tell which captions were too long.
        windows = self.cfg.long_text == "windows"
        enc = self.tokenizer(texts, padding=self.cfg.padding or "longest", truncation=True, max_length=L,
                             return_overflowing_tokens=True, stride=self.cfg.window_overlap if windows else 0,
                             return_tensors="pt")
        owner = enc.pop("overflow_to_sample_mapping")
        first = torch.ones_like(owner, dtype=torch.bool)
        first[1:] = owner[1:] != owner[:-1]
        self._count_truncations(len(set(owner[~first].tolist())), len(texts))
        if windows:
            return {**{k: v for k, v in enc.items() if torch.is_tensor(v)}, "window_owner": owner}
        return {k: v[first] for k, v in enc.items() if torch.is_tensor(v)}

    def _count_truncations(self, n: int, total: int) -> None:
        before = self.truncated
        self.truncated += n
        self.seen += total
        # Warn at the first truncation and each time the count doubles, so logs stay short on long runs.
        if n and (before == 0 or self.truncated.bit_length() > before.bit_length()):
            log.warning(
                "%s: %d of %d captions so far were longer than max_length=%d tokens and were %s",
                self.name, self.truncated, self.seen, self.max_length,
                "encoded as averaged windows" if self.cfg.long_text == "windows" else "truncated",
            )

    def save_assets(self, tower: nn.Module, directory: Path) -> dict:
        updates = super().save_assets(tower, directory)
        if updates:
            self.tokenizer.save_pretrained(directory)
            updates["tokenizer"] = None
        return updates


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
        if getattr(self.model, "pooler", None) is not None:
            # Pooling is ours (below); a pooler whose output is unused never gets gradients, which stalls DDP.
            self.model.pooler = None
        self.pooling = pooling
        self.out_dim = self.model.config.hidden_size

    def save_config(self, directory: Path) -> None:
        self.model.config.save_pretrained(directory)

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


register_tower(TextModality, "hf_clip")(hf_dual_tower("text"))


class OpenClipText(nn.Module):
    """The text transformer of an open_clip architecture (EOT-token pooling and text projection)."""

    def __init__(self, model_name: str, pretrained: str | None, **kwargs):
        super().__init__()
        model = create_open_clip(model_name, pretrained, **kwargs)
        model.visual = None
        self.model = model
        self.model_name = model_name
        self.out_dim = model.text_projection.shape[1] if hasattr(model, "text_projection") else model.text.output_dim
        self.preprocess = {"max_length": model.context_length}

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode_text(inputs["input_ids"])


@register_tower(TextModality, "open_clip")
def open_clip_text(cfg: TextConfig) -> nn.Module:
    return OpenClipText(*model_and_weights(cfg, "an open_clip architecture name, e.g. ViT-B-32"), **cfg.tower_kwargs)
