"""Text modality: captions from ``txt``/``json`` members, tokenisers, and towers (any HF encoder, open_clip text,
mmalign's CoCa caption decoder).

A ``txt`` member holds one caption per non-empty line; a ``json`` member holds a string, a list of strings, or an
object with ``captions``/``caption``/``text``. Training picks one caption at random per sample; evaluation keeps all of them.
"""
from __future__ import annotations

import functools
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
    tokenizer: str | None = None  # defaults to the tower's own (coca_decoder: open_clip's CLIP BPE)


DEFAULT_CAPTION_TOKENIZER = "ViT-B-32"  # open_clip's CLIP BPE: ships with open_clip, so it works offline
CAPTION_TOWERS = ("coca_decoder", "open_clip_coca")  # text towers that are caption decoders


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
        if cfg.long_text == "windows" and (cfg.tower == "open_clip" or cfg.tower in CAPTION_TOWERS):
            raise ConfigError(f"modality {name!r}: long_text: windows needs an HF encoder tower (hf or hf_clip)")
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
    def captions(self) -> bool:
        """Whether the tower is a caption decoder (its tokens are ``[BOS] caption [EOS]``, see ``CaptionTokenizer``)."""
        return self.cfg.tower in CAPTION_TOWERS

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            cfg = self.cfg
            if self.captions:
                name = cfg.tokenizer or (cfg.model if cfg.tower == "open_clip_coca" else DEFAULT_CAPTION_TOKENIZER)
                self._tokenizer = caption_tokenizer(name, cfg.trust_remote_code)
            elif cfg.tower == "open_clip":
                import open_clip

                self._tokenizer = open_clip.get_tokenizer(cfg.tokenizer or cfg.model, context_length=self.max_length)
            else:
                from transformers import AutoTokenizer

                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
                self._tokenizer = AutoTokenizer.from_pretrained(
                    resolve_pretrained(cfg.tokenizer or cfg.model), trust_remote_code=cfg.trust_remote_code
                )
        return self._tokenizer

    def prepare(self) -> None:
        self.tokenizer  # noqa: B018  (loads it)

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
        if self.captions:
            pad_to = L if self.cfg.padding == "max_length" else 0
            ids, mask, truncated = self.tokenizer.encode(texts, L, pad_to)
            self._count_truncations(truncated, len(texts))
            return {"input_ids": ids, "attention_mask": mask}
        if self.cfg.tower == "open_clip":
            tok = self.tokenizer
            ids = tok(texts)
            # CLIP BPE pads with 0 and adds sot/eot; open_clip's HFTokenizer (e.g. SigLIP) wraps a transformers one
            hf = getattr(tok, "tokenizer", None)
            pad = hf.pad_token_id if hf is not None and hf.pad_token_id is not None else 0

            def length(text: str) -> int:
                return len(hf(tok.clean_fn(text))["input_ids"]) if hf is not None else len(tok.encode(text)) + 2

            # Only a caption that fills every position may have been cut: re-encode just those to know (tokenising
            # every caption twice took ~6% of the data pipeline's CPU time in benchmarks/bench_data.py).
            full = (ids[:, -1] != pad).nonzero().flatten().tolist()
            self._count_truncations(sum(length(texts[i]) > L for i in full), len(texts))
            return {"input_ids": ids, "attention_mask": (ids != pad).long()}
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
        if self.captions:
            return {"tokenizer": f"./{directory.name}"} if self.tokenizer.save(directory) else {}
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


@register_tower(TextModality, "coca_decoder")
def coca_decoder(cfg: TextConfig) -> nn.Module:
    tok = caption_tokenizer(cfg.tokenizer or DEFAULT_CAPTION_TOKENIZER, cfg.trust_remote_code)
    context_length = cfg.max_length or TextModality.defaults["max_length"]
    return CocaDecoderTower(tok.vocab_size, context_length, tok.pad_id, **cfg.tower_kwargs)


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
        # open_clip's CoCa appends its CLS token after the padding, so its text embedding depends on the padded
        # length: pad every caption to the full context, as open_clip's tokenizer does.
        self.preprocess = {"max_length": self.context_length, "padding": "max_length"}

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.text(inputs["input_ids"])[0]

    def caption(self, inputs: dict[str, torch.Tensor], context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, states = self.text(inputs["input_ids"])
        return pooled, self.text_decoder(context, states)

    def step(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.text_decoder(context, self.text(tokens)[1])[:, -1]


@register_tower(TextModality, "open_clip_coca")
def open_clip_coca_text(cfg: TextConfig) -> nn.Module:
    tower = OpenClipCocaText(*model_and_weights(cfg, "an open_clip CoCa architecture, e.g. coca_ViT-B-32"),
                             **cfg.tower_kwargs)
    if cfg.max_length and cfg.max_length > tower.context_length:
        raise ConfigError(f"text tower open_clip_coca: max_length {cfg.max_length} exceeds the model's "
                          f"{tower.context_length} text positions")
    return tower
