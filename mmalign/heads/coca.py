"""CoCa heads (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models").

- ``CocaHead``: turns any modality tower's token sequence (B x N x C) into the contrastive embedding (one-query
  attentional pooler) and the captioning context (n-query attentional pooler).
- ``CocaTextDecoder``: a causal text transformer. Its first half is unimodal, with a learned CLS token appended
  after the text whose output is the contrastive text embedding; its second half cross-attends to the context and
  ends in the LM head. ``forward`` gives both; ``step`` gives next-token logits for ``heads.generation.generate``.
- ``open_clip_coca``: open_clip's own CoCa architecture (from scratch or a checkpoint) behind the same interface.

Shapes: B batch, T text length, V vocabulary, N context tokens, D embedding dim. Masks are True (or 1) where a
token is real and False where it is padding, for text (``attention_mask``) and context (``context_mask``) alike.
Embeddings are returned *unnormalised*; the caller L2-normalises them before the loss.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .pooler import AttentionalPooler

log = logging.getLogger(__name__)


def _self_attention_mask(valid: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Boolean mask for ``nn.MultiheadAttention`` (True = may *not* attend): causal, and padding keys blocked.

    valid: B x L, True for real tokens. Returns L x L when nothing is padded, else (B * n_heads) x L x L. A query
    always sees itself, so no row is fully masked (left padding stays finite).
    """
    L = valid.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=valid.device).triu(1)
    if bool(valid.all()):
        return causal
    blocked = causal.unsqueeze(0) | ~valid.unsqueeze(1)
    blocked &= ~torch.eye(L, dtype=torch.bool, device=valid.device)
    return blocked.repeat_interleave(n_heads, dim=0)


class CocaTextDecoder(nn.Module):
    """Causal text decoder with a contrastive CLS output and cross-attention to a context of any modality.

    tokens -> token embedding + learned positions -> [tokens, CLS] -> ``unimodal_layers`` causal self-attention
    layers. The CLS output -> LayerNorm -> linear projection (width -> embed_dim) is the text embedding. The text
    positions then go through ``layers - unimodal_layers`` decoder layers (causal self-attention, cross-attention
    to ``LayerNorm(context)`` projected to ``width``, MLP) -> LayerNorm -> LM head (width -> vocab_size).
    Because attention is causal and CLS comes last, the logits at position t depend on tokens <= t only and never
    on CLS. Pre-norm layers with GELU (``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``).

    pad_id: if given, ``forward`` without an ``attention_mask`` treats tokens equal to it as padding.
    embed_dim: None leaves out the text projection (the embedding is then ``width`` wide and the caller projects it,
    as ``ModalityAdapter`` does for the ``coca_decoder`` text tower).
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int | None,
        context_dim: int,
        width: int = 512,
        heads: int = 8,
        layers: int = 12,
        unimodal_layers: int | None = None,
        context_length: int = 77,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        pad_id: int | None = None,
    ):
        super().__init__()
        unimodal_layers = layers // 2 if unimodal_layers is None else unimodal_layers
        if not 0 < unimodal_layers < layers:
            raise ValueError(f"need 0 < unimodal_layers < layers, got {unimodal_layers} of {layers}")
        self.vocab_size, self.context_length, self.heads, self.pad_id = vocab_size, context_length, heads, pad_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length + 1, width) * 0.01)  # +1: CLS slot
        self.cls_embedding = nn.Parameter(torch.randn(width) * 0.01)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

        def layer(cls):
            return cls(width, heads, int(width * mlp_ratio), dropout, activation="gelu", batch_first=True,
                       norm_first=True)

        self.unimodal = nn.ModuleList(layer(nn.TransformerEncoderLayer) for _ in range(unimodal_layers))
        self.multimodal = nn.ModuleList(layer(nn.TransformerDecoderLayer) for _ in range(layers - unimodal_layers))
        self.ln_cls = nn.LayerNorm(width)
        self.text_projection = nn.Linear(width, embed_dim, bias=False) if embed_dim else nn.Identity()
        self.ln_context = nn.LayerNorm(context_dim)
        self.context_projection = nn.Linear(context_dim, width) if context_dim != width else nn.Identity()
        self.ln_final = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)

    def _valid(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is not None:
            return attention_mask.bool()
        if self.pad_id is not None:
            return tokens != self.pad_id
        return torch.ones_like(tokens, dtype=torch.bool)

    def _unimodal(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None, with_cls: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The unimodal half: (CLS embedding or None, text states B x T x width, their self-attention mask)."""
        B, T = tokens.shape
        if T > self.context_length:
            raise ValueError(f"{T} tokens exceed the decoder's context_length {self.context_length}")
        valid = self._valid(tokens, attention_mask)
        x = self.token_embedding(tokens) + self.positional_embedding[:T]
        if with_cls:
            cls = (self.cls_embedding + self.positional_embedding[T]).expand(B, 1, -1)
            x = torch.cat([x, cls], dim=1)
            valid = torch.cat([valid, valid.new_ones(B, 1)], dim=1)
        mask = _self_attention_mask(valid, self.heads)
        for layer in self.unimodal:
            x = layer(x, src_mask=mask)
        if not with_cls:
            return None, x, mask
        # text rows never attend to CLS (it is last), so dropping it leaves them unchanged
        return self.text_projection(self.ln_cls(x[:, -1])), x[:, :T], mask[..., :T, :T]

    def _multimodal(
        self, x: torch.Tensor, mask: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The cross-attending half on the text states: logits B x T x V."""
        memory = self.context_projection(self.ln_context(context))
        memory_padding = None if context_mask is None else ~context_mask.bool()
        for layer in self.multimodal:
            x = layer(x, memory, tgt_mask=mask, memory_key_padding_mask=memory_padding)
        return self.lm_head(self.ln_final(x))

    def encode(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The text embedding alone (unimodal half + CLS, no context needed): B x embed_dim, unnormalised."""
        return self._unimodal(tokens, attention_mask, with_cls=True)[0]

    def forward(
        self,
        tokens: torch.Tensor,
        context: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """tokens: B x T ids (BOS ... EOS, right padding); context: B x N x context_dim (e.g. ``CocaHead`` output);
        attention_mask: B x T, 1 for real tokens (default: ``tokens != pad_id`` if pad_id was given, else all);
        context_mask: B x N, 1 for real context tokens (default: all).

        Returns ``{"text_embedding": B x embed_dim (unnormalised), "logits": B x T x V}`` where ``logits[:, t]``
        predicts ``tokens[:, t + 1]``: the caption loss takes ``logits[:, :-1]`` and ``tokens[:, 1:]``.
        """
        embedding, x, mask = self._unimodal(tokens, attention_mask, with_cls=True)
        return {"text_embedding": embedding, "logits": self._multimodal(x, mask, context, context_mask)}

    def step(
        self, tokens: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token logits B x V after ``tokens`` (B x t, no padding inside), skipping the CLS branch.

        This is the ``logits_fn`` that ``mmalign.heads.generation.generate`` calls (full recompute, no KV cache).
        """
        _, x, mask = self._unimodal(tokens, torch.ones_like(tokens, dtype=torch.bool), with_cls=False)
        return self._multimodal(x, mask, context, context_mask)[:, -1]


class CocaHead(nn.Module):
    """Two attentional poolers over a modality tower's tokens: one query for the contrastive embedding, and
    ``n_queries`` for the context the caption decoder cross-attends to.

    token_dim: C of the tower's tokens; context_dim: width of the context (the decoder's ``context_dim``);
    embed_dim: the shared contrastive embedding size.
    """

    def __init__(self, token_dim: int, embed_dim: int, context_dim: int, n_queries: int = 256, n_heads: int = 8):
        super().__init__()
        self.caption_pooler = AttentionalPooler(context_dim, token_dim, n_queries, n_heads)
        self.contrastive_pooler = AttentionalPooler(context_dim, token_dim, 1, n_heads)
        self.ln_embedding = nn.LayerNorm(context_dim)
        self.projection = nn.Linear(context_dim, embed_dim, bias=False)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """tokens: B x N x token_dim; mask: optional B x N, True for real tokens.

        Returns ``{"embedding": B x embed_dim (unnormalised), "context": B x n_queries x context_dim}``.
        """
        return {"embedding": self.embed(tokens, mask), "context": self.caption_pooler(tokens, mask)}

    def embed(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The contrastive embedding alone (B x embed_dim, unnormalised), without the caption context."""
        pooled = self.contrastive_pooler(tokens, mask)[:, 0]
        return self.projection(self.ln_embedding(pooled))


class OpenClipCoca(nn.Module):
    """open_clip's ``CoCa`` behind the interface above; ``self.model`` is the open_clip module itself.

    Token ids come from ``self.tokenizer`` (open_clip's tokenizer for the architecture); ``bos_id``, ``eos_id`` and
    ``pad_id`` are its start, end and padding ids (open_clip pads with 0).
    """

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.bos_id = int(getattr(tokenizer, "sot_token_id", 49406))
        self.eos_id = int(getattr(tokenizer, "eot_token_id", 49407))
        self.pad_id = int(getattr(model, "pad_id", 0))
        self.context_length = int(model.context_length)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images B x 3 x H x W -> (embedding B x D unnormalised, context tokens B x N x W for the decoder)."""
        return self.model._encode_image(images, normalize=False)

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens B x T -> (CLS text embedding B x D unnormalised, unimodal token states B x T x W)."""
        return self.model._encode_text(tokens, normalize=False)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """-> image_embedding, text_embedding (B x D, unnormalised), logits B x T x V with ``logits[:, t]``
        predicting ``tokens[:, t + 1]`` (unlike open_clip's own forward, the sequence is not truncated first)."""
        image_embedding, context = self.encode_image(images)
        text_embedding, states = self.encode_text(tokens)
        return {"image_embedding": image_embedding, "text_embedding": text_embedding,
                "logits": self.model.text_decoder(context, states)}

    def step(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Next-token logits B x V after ``tokens`` B x t, given ``context`` from ``encode_image``."""
        return self.model.text_decoder(context, self.encode_text(tokens)[1])[:, -1]

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Generated ids (BOS first) -> strings: the tokens after BOS up to the first EOS."""
        out = []
        for row in tokens.tolist():
            row = row[1:] if row and row[0] == self.bos_id else row
            row = row[: row.index(self.eos_id)] if self.eos_id in row else row
            out.append(self.tokenizer.decode(row).strip())
        return out


def open_clip_coca(model_name: str = "coca_ViT-B-32", pretrained: str | None = None, **kwargs) -> OpenClipCoca:
    """Build open_clip's CoCa ``model_name`` with random weights (``pretrained=None``) or from ``pretrained``: a
    local checkpoint file (what open_clip saves, or a bare state dict), or an open_clip tag where a network exists.
    ``kwargs`` go to ``open_clip.create_model``. Returns an ``OpenClipCoca``.
    """
    import open_clip

    model = open_clip.create_model(model_name, pretrained=pretrained, **kwargs)
    if type(model).__name__ != "CoCa":
        raise ValueError(f"{model_name!r} is not a CoCa architecture in open_clip (got {type(model).__name__})")
    if pretrained is None:
        # open_clip never initialises MultimodalTransformer.text_projection (its init_parameters is never called, and
        # fails if called): it holds whatever memory torch.empty returned, garbage logits once it trains. Initialise
        # it as that method means to, N(0, width^-1/2).
        decoder = model.text_decoder
        nn.init.normal_(decoder.text_projection, std=decoder.width ** -0.5)
    log.info("built open_clip %s (%s)", model_name, pretrained or "random init")
    return OpenClipCoca(model, open_clip.get_tokenizer(model_name))
