"""Text modality: captions from ``txt``/``json`` members, tokenisers, and towers (any HF encoder, open_clip text,
mmalign's CoCa caption decoder).

A ``txt`` member holds one caption per non-empty line; a ``json`` member holds a string, a list of strings, or an
object with ``captions``/``caption``/``text``. Training picks one caption at random per sample; evaluation keeps all of them.

Each text tower declares its tokenizer in its spec (``TextTowerSpec``): ``HFTokenizer`` (HF encoders, which can also
split long captions into windows), ``OpenClipTokenizer``, or a ``CaptionTokenizer`` (caption decoders: ``[BOS] caption
[EOS]``). A tokenizer turns captions into the tower's inputs (``tokenize``) and writes its files next to a saved model
(``save``).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..modality_config import TextConfig
from .hf import HFExport, dual_tower_spec, load_hf_config, resolve_pretrained, text_positions
from .openclip import OpenClipExport, drop_logit_parameters, open_clip_context_length, open_clip_tower_model
from .registry import (OWNER, TOWERS, Modality, TowerSpec, check_context_length, model_and_weights, named_errors,
                       register_modality, register_tower)

log = logging.getLogger(__name__)

DEFAULT_CAPTION_TOKENIZER = "ViT-B-32"  # open_clip's CLIP BPE: ships with open_clip, so it works offline


@dataclass(frozen=True, kw_only=True)
class TextTowerSpec(TowerSpec):
    """A text tower's spec adds its tokenizer (resolved config -> an object with ``tokenize(texts, cfg) -> (inputs,
    number of captions truncated)`` and ``save(directory) -> bool``) and whether it takes ``long_text: windows``."""

    tokenizer: Callable[[TextConfig], Any]
    windows: bool = False


class HFTokenizer:
    """An HF tokenizer (``AutoTokenizer``: ``cfg.tokenizer``, else the tower's ``model``).

    With ``long_text: windows`` a long caption becomes several rows (windows of ``max_length`` tokens sharing
    ``window_overlap`` tokens) and ``owner`` says which caption each row belongs to; the adapter averages the windows'
    features.
    """

    def __init__(self, cfg: TextConfig):
        from transformers import AutoTokenizer

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.hf = AutoTokenizer.from_pretrained(resolve_pretrained(cfg.tokenizer or cfg.model),
                                                trust_remote_code=cfg.trust_remote_code)

    def tokenize(self, texts: list[str], cfg: TextConfig) -> tuple[dict[str, torch.Tensor], int]:
        # One pass: overflowing tokens come back as extra rows, which tell which captions were too long.
        windows = cfg.long_text == "windows"
        enc = self.hf(texts, padding=cfg.padding, truncation=True, max_length=cfg.max_length,
                      return_overflowing_tokens=True, stride=cfg.window_overlap if windows else 0, return_tensors="pt")
        owner = enc.pop("overflow_to_sample_mapping")
        first = torch.ones_like(owner, dtype=torch.bool)
        first[1:] = owner[1:] != owner[:-1]
        truncated = len(set(owner[~first].tolist()))
        if windows:
            return {**{k: v for k, v in enc.items() if torch.is_tensor(v)}, OWNER: owner}, truncated
        return {k: v[first] for k, v in enc.items() if torch.is_tensor(v)}, truncated

    def save(self, directory: Path) -> bool:
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(directory)
        return True


class OpenClipTokenizer:
    """open_clip's tokenizer of the architecture (CLIP BPE, or the HF tokenizer its ``text_cfg`` names), padded to
    ``max_length``. It ships with open_clip (or is named by the architecture), so nothing is saved."""

    def __init__(self, cfg: TextConfig):
        import open_clip

        self.tok = open_clip.get_tokenizer(cfg.tokenizer or cfg.model, context_length=cfg.max_length)

    def tokenize(self, texts: list[str], cfg: TextConfig) -> tuple[dict[str, torch.Tensor], int]:
        tok = self.tok
        ids = tok(texts)
        # CLIP BPE pads with 0 and adds sot/eot; open_clip's HFTokenizer (e.g. SigLIP) wraps a transformers one
        hf = getattr(tok, "tokenizer", None)
        pad = hf.pad_token_id if hf is not None and hf.pad_token_id is not None else 0

        def length(text: str) -> int:
            return len(hf(tok.clean_fn(text))["input_ids"]) if hf is not None else len(tok.encode(text)) + 2

        # Only a caption that fills every position may have been cut: re-encode just those to know (tokenising
        # every caption twice took ~6% of the data pipeline's CPU time in benchmarks/bench_data.py).
        full = (ids[:, -1] != pad).nonzero().flatten().tolist()
        truncated = sum(length(texts[i]) > cfg.max_length for i in full)
        return {"input_ids": ids, "attention_mask": (ids != pad).long()}, truncated

    def save(self, directory: Path) -> bool:
        return False


class CaptionTokenizer:
    """Token ids for a caption decoder and back to text: ``[BOS] words [EOS]`` then padding.

    ``name`` is an open_clip architecture (its tokenizer: CLIP BPE, sot/eot, pad 0) or an HF tokenizer (hub name
    or local folder; BOS = its bos token, else cls; EOS = eos, else sep; pad = pad, else EOS). The attention mask,
    not the pad id, marks padding, so captions from a tokenizer that pads with EOS still learn to stop.
    """

    def __init__(self, name: str, trust_remote_code: bool = False):
        import open_clip

        self.name = name
        self.hf = None
        if name in open_clip.list_models():
            tok = open_clip.get_tokenizer(name)
            if isinstance(tok, open_clip.tokenizer.SimpleTokenizer):
                self.bpe = tok
                self.bos_id, self.eos_id, self.pad_id = tok.sot_token_id, tok.eot_token_id, 0
                self.vocab_size = tok.vocab_size
                return
            self.hf = tok.tokenizer  # open_clip's HFTokenizer wraps a transformers tokenizer
        else:
            from transformers import AutoTokenizer

            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            try:
                self.hf = AutoTokenizer.from_pretrained(resolve_pretrained(name), trust_remote_code=trust_remote_code)
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot load tokenizer {name!r} (an open_clip architecture name, an HF hub name "
                                  f"or a local folder): {str(e).splitlines()[0]}") from None
        tok = self.hf
        self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        if self.bos_id is None or self.eos_id is None:
            raise ConfigError(f"tokenizer {name!r} has no bos/cls or no eos/sep token to start and end captions")
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(tok)

    def tokenize(self, texts: list[str], cfg: TextConfig) -> tuple[dict[str, torch.Tensor], int]:
        """Token ids and attention mask (padded to ``max_length`` with ``padding: max_length``), truncations."""
        ids, mask, truncated = self.encode(texts, cfg.max_length, cfg.max_length if cfg.padding == "max_length" else 0)
        return {"input_ids": ids, "attention_mask": mask}, truncated

    def encode(self, texts: list[str], max_length: int, pad_to: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(input_ids B x T, attention_mask B x T, number of captions truncated), right padding to the longest
        caption or ``pad_to``, T <= max_length."""
        if self.hf is not None:
            words = self.hf(list(texts), add_special_tokens=False)["input_ids"]
        else:
            words = [self.bpe.encode(t) for t in texts]
        rows = [[self.bos_id] + w[: max_length - 2] + [self.eos_id] for w in words]
        T = max(pad_to, *(len(r) for r in rows))
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask, sum(len(w) > max_length - 2 for w in words)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Generated ids B x L (BOS first) -> the text between BOS and the first EOS of each row."""
        out = []
        for row in ids.tolist():
            row = row[1:] if row and row[0] == self.bos_id else row
            row = row[: row.index(self.eos_id)] if self.eos_id in row else row
            if self.hf is not None:
                out.append(self.hf.decode(row, skip_special_tokens=True).strip())
            else:
                out.append(self.bpe.decode(row).strip())
        return out

    def save(self, directory: Path) -> bool:
        """Write an HF tokenizer's files to ``directory`` (True); open_clip's ship with open_clip (False)."""
        if self.hf is None:
            return False
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(directory)
        return True


@functools.lru_cache(maxsize=8)
def caption_tokenizer(name: str, trust_remote_code: bool = False) -> CaptionTokenizer:
    """One shared ``CaptionTokenizer`` per name (the tower needs its vocabulary size, the modality its ids)."""
    return CaptionTokenizer(name, trust_remote_code)


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
    spec_class = TextTowerSpec
    default_tower = "hf"
    defaults = {"max_length": 77, "padding": "longest"}

    def __init__(self, name: str, cfg: TextConfig):
        super().__init__(name, cfg)
        if cfg.pooling not in ("mean", "cls"):
            raise ConfigError(f"modality {name!r}: pooling must be mean or cls, got {cfg.pooling!r}")
        if cfg.padding not in ("longest", "max_length"):
            raise ConfigError(f"modality {name!r}: padding must be longest or max_length, got {cfg.padding!r}")
        if cfg.long_text not in ("truncate", "windows"):
            raise ConfigError(f"modality {name!r}: long_text must be truncate or windows, got {cfg.long_text!r}")
        if cfg.long_text == "windows" and not self.spec.windows:
            windowed = sorted(n for n, spec in TOWERS[self.kind].items() if spec.windows)
            raise ConfigError(f"modality {name!r}: long_text: windows needs an HF encoder tower "
                              f"({' or '.join(windowed)})")
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
        """The tower's tokenizer (its spec's), loaded at first use in each process."""
        if self._tokenizer is None:
            with named_errors(self.name):
                self._tokenizer = self.spec.tokenizer(self.cfg)
        return self._tokenizer

    def prepare(self) -> None:
        self.tokenizer  # noqa: B018  (loads it)

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    @property
    def max_length(self) -> int:
        return self.cfg.max_length

    def collate(self, items: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenize(items)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, truncated to ``max_length``; truncations are counted and reported."""
        inputs, truncated = self.tokenizer.tokenize(texts, self.cfg)
        self._count_truncations(truncated, len(texts))
        return inputs

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
        """The tower's config (HF towers) and the tokenizer's files: in the model's folder, or a folder of its own."""
        updates = super().save_assets(tower, directory)
        if self.tokenizer.save(directory):
            updates["tokenizer"] = None if "model" in updates else f"./{directory.name}"
        return updates

    def save_hf_preprocessor(self, directory: Path) -> dict:
        self.tokenizer.save(directory)
        cfg = self.cfg
        return {"max_length": cfg.max_length, "padding": cfg.padding, "long_text": cfg.long_text,
                "window_overlap": cfg.window_overlap}


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

    def hf_export(self) -> HFExport:
        return HFExport(self.model, self.pooling)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["attention_mask"]
        hidden = self.model(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def hf_text(cfg: TextConfig) -> nn.Module:
    tower = HFTextTower(cfg.model, cfg.pooling, cfg.init == "scratch", cfg.trust_remote_code, **cfg.tower_kwargs)
    check_context_length(cfg, text_positions(tower), "hf")
    return tower


def hf_text_defaults(cfg: TextConfig) -> dict:
    """77 tokens, or fewer where the model has fewer positions (``max_position_embeddings``). A model whose config
    cannot be read gets none here: building its tower says why, and a modality used without its tower (data tools)
    needs none."""
    try:
        config = load_hf_config(cfg.model, cfg.trust_remote_code, **cfg.tower_kwargs)
    except ConfigError:
        return {}
    positions = getattr(config, "max_position_embeddings", None)
    return {"max_length": min(77, positions)} if positions else {}


register_tower("text", "hf", TextTowerSpec(build=hf_text, defaults=hf_text_defaults, tokenizer=HFTokenizer,
                                           windows=True, model="a hub name or local folder",
                                           export={"hf": HFTextTower.hf_export}))
register_tower("text", "hf_clip", dual_tower_spec("text", TextTowerSpec, tokenizer=HFTokenizer, windows=True))


class OpenClipText(nn.Module):
    """The text transformer of an open_clip architecture (EOT-token pooling and text projection)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        model, self.model_cfg = open_clip_tower_model(cfg)
        check_context_length(cfg, int(self.model_cfg["text_cfg"].get("context_length", 77)), "open_clip")
        model.visual = None
        drop_logit_parameters(model)
        self.model = model
        self.model_name = cfg.model
        self.out_dim = model.text_projection.shape[1] if hasattr(model, "text_projection") else model.text.output_dim

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode_text(inputs["input_ids"])

    def open_clip_export(self) -> OpenClipExport:
        return OpenClipExport("text", self.model_name, self.model_cfg, self.model.state_dict(), "text_projection")


register_tower("text", "open_clip", TextTowerSpec(
    build=OpenClipText, defaults=lambda cfg: {"max_length": open_clip_context_length(cfg)}, tokenizer=OpenClipTokenizer,
    model="an open_clip architecture name, e.g. ViT-B-32", export={"open_clip": OpenClipText.open_clip_export}))


class CocaDecoderTower(nn.Module):
    """mmalign's CoCa text decoder (``heads.CocaTextDecoder``) as a text tower, trained from scratch.

    ``forward`` runs the unimodal half and returns the CLS features (``width`` wide; the adapter's projection makes
    them the text embedding), which is all zero-shot and retrieval need. ``caption`` (training) and ``step``
    (generation) add the half that cross-attends to a ``context_dim``-wide context from the captioned modality.
    tower_kwargs: ``CocaTextDecoder`` sizes (width, heads, layers, unimodal_layers, mlp_ratio, dropout).
    """

    def __init__(self, vocab_size: int, context_length: int, pad_id: int, **kwargs):
        super().__init__()
        from ..heads import CocaTextDecoder

        width = kwargs.setdefault("width", 512)
        try:
            self.decoder = CocaTextDecoder(vocab_size, None, width, context_length=context_length, pad_id=pad_id,
                                           **kwargs)
        except (TypeError, ValueError, AssertionError) as e:
            raise ConfigError(f"text tower coca_decoder: {e}") from None
        self.out_dim = self.context_dim = width

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.decoder.encode(inputs["input_ids"], inputs["attention_mask"])

    def caption(self, inputs: dict[str, torch.Tensor], context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS features B x out_dim, logits B x T x V with ``logits[:, t]`` predicting token t + 1)."""
        out = self.decoder(inputs["input_ids"], context, inputs["attention_mask"])
        return out["text_embedding"], out["logits"]

    def step(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.decoder.step(tokens, context)


def coca_decoder_tokenizer(cfg: TextConfig) -> CaptionTokenizer:
    return caption_tokenizer(cfg.tokenizer or DEFAULT_CAPTION_TOKENIZER, cfg.trust_remote_code)


def coca_decoder(cfg: TextConfig) -> nn.Module:
    tok = coca_decoder_tokenizer(cfg)
    return CocaDecoderTower(tok.vocab_size, cfg.max_length, tok.pad_id, **cfg.tower_kwargs)


register_tower("text", "coca_decoder", TextTowerSpec(build=coca_decoder, tokenizer=coca_decoder_tokenizer))


class OpenClipCocaText(nn.Module):
    """The text side of an open_clip CoCa architecture (``coca_ViT-B-32``, ...), from scratch or a checkpoint:
    its text transformer (CLS appended; the projected CLS output is the text embedding, ``out_dim`` = the CoCa
    embed_dim) and its multimodal decoder, which cross-attends to ``context_dim``-wide image tokens.

    Pair it with the same architecture's image tower (``tower: open_clip``) and ``model.caption.n_queries: 0`` to
    get open_clip's CoCa exactly (both projections ``none``); any other tower with tokens works through a head.
    """

    def __init__(self, model_name: str, pretrained: str | None, **kwargs):
        super().__init__()
        from ..heads import open_clip_coca

        try:
            coca = open_clip_coca(model_name, pretrained, **kwargs).model
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"text tower open_clip_coca: {model_name!r} (pretrained={pretrained!r}): {e}") from None
        self.text, self.text_decoder = coca.text, coca.text_decoder
        self.out_dim = coca.text.output_dim
        self.context_dim = coca.text_decoder.width
        self.context_length = coca.text.context_length  # text positions (one more holds the CLS token)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.text(inputs["input_ids"])[0]

    def caption(self, inputs: dict[str, torch.Tensor], context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, states = self.text(inputs["input_ids"])
        return pooled, self.text_decoder(context, states)

    def step(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.text_decoder(context, self.text(tokens)[1])[:, -1]


def open_clip_coca_text(cfg: TextConfig) -> nn.Module:
    tower = OpenClipCocaText(*model_and_weights(cfg), **cfg.tower_kwargs)
    check_context_length(cfg, tower.context_length, "open_clip_coca")
    return tower


register_tower("text", "open_clip_coca", TextTowerSpec(
    build=open_clip_coca_text,
    # open_clip's CoCa appends its CLS token after the padding, so its text embedding depends on the padded length:
    # pad every caption to the full context, as open_clip's tokenizer does.
    defaults=lambda cfg: {"max_length": open_clip_context_length(cfg), "padding": "max_length"},
    tokenizer=lambda cfg: caption_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code),
    model="an open_clip CoCa architecture, e.g. coca_ViT-B-32"))
