"""Captioning objective for CoCa: token cross-entropy that ignores the tokenizer's pad id, plus the registered
``"coca"`` objective (contrastive + captioning, Yu et al. 2022).

Alignment convention (no shift happens in here): ``labels[b, t]`` is the target of ``logits[b, t]``. A decoder that
"predicts token t+1 from tokens <= t" and is run on the whole token sequence ``tokens`` (B x T) returns logits
B x T x V; the caller passes ``logits[:, :-1]`` and ``tokens[:, 1:]`` (``next_token_targets`` does exactly that).
"""
from __future__ import annotations

import operator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..distributed import is_distributed, world_size
from ..errors import ConfigError
from .contract import AlignmentOutput, CaptionTargets, Requirements
from .objectives import ClipObjective, Objective, Scale
from .registry import register_loss


def next_token_targets(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align a decoder's logits B x T x V over ``tokens`` B x T with their targets: (logits[:, :-1], tokens[:, 1:])."""
    return logits[:, :-1], tokens[:, 1:]


def caption_targets(
    logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor, ignore_id: int = -100
) -> CaptionTargets:
    """What the ``coca`` objective's caption term reads, from a decoder's logits over ``tokens`` (B x T).

    Targets are ``tokens[:, 1:]``; those at padded positions (``attention_mask`` 0) become ``ignore_id``, which is
    passed as ``pad_id``. Marking padding by the mask rather than by the tokenizer's pad id keeps every EOS target,
    even for tokenizers that pad with their EOS id.
    """
    logits, labels = next_token_targets(logits, tokens)
    return CaptionTargets(logits, labels.masked_fill(attention_mask[:, 1:] == 0, ignore_id), ignore_id)


def _caption_ce_sum(
    logits: torch.Tensor, labels: torch.Tensor, pad_id: int, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the token cross-entropies over non-pad labels, and the number of those labels (a long tensor)."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"caption_loss needs logits B x T x V and labels B x T, got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    if pad_id is None or isinstance(pad_id, bool):
        raise TypeError(f"pad_id must be the tokenizer's pad token id (an int), got {pad_id!r}")
    pad_id = operator.index(pad_id)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    if flat_logits.dtype in (torch.float16, torch.bfloat16):  # softmax over a large vocabulary in float32
        flat_logits = flat_logits.float()
    flat_labels = labels.reshape(-1).long()
    total = F.cross_entropy(
        flat_logits, flat_labels, ignore_index=pad_id, reduction="sum", label_smoothing=label_smoothing
    )
    return total, (flat_labels != pad_id).sum()


def caption_loss(
    logits: torch.Tensor, labels: torch.Tensor, pad_id: int, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean token cross-entropy over the labels that are not ``pad_id``.

    logits: B x T x V, already aligned with ``labels`` (``labels[b, t]`` is the target of ``logits[b, t]``; see
    ``next_token_targets``). labels: B x T token ids. pad_id: the tokenizer's *actual* pad id (any int, e.g. 0 for
    open_clip's tokenizer, 1 for some HF tokenizers, or -100 if the caller marked ignored positions that way).
    Equals ``F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=pad_id)``; a batch with no
    non-pad label returns 0 (still attached to the graph) instead of NaN.

    If the tokenizer pads with its EOS id, ignoring pad_id would also ignore every EOS target and the decoder would
    never learn to stop: set the padding labels to a distinct id (e.g. -100) and pass that as ``pad_id`` instead.
    """
    total, count = _caption_ce_sum(logits, labels, pad_id, label_smoothing)
    return total / count.clamp(min=1)


@register_loss("coca")
class CocaObjective(Objective):
    """CoCa: ``lambda_con * CLIP(embeddings) + lambda_cap * caption CE`` (defaults 1 and 2, as in the CoCa paper).

    The contrastive term is the registered CLIP objective over ``modalities`` (with M > 2, the mean over pairs) on
    the output's embeddings (the text embedding is the decoder's CLS output); the caption term reads
    ``output.caption`` (logits B x T x V and labels B x T, aligned: see ``caption_targets``). Under
    ``torch.distributed`` the caption term is each rank's token-loss sum divided by the global number of non-pad
    tokens, times the world size, so the mean over ranks equals the single-process token mean on the concatenated
    batch even when ranks hold different numbers of tokens.
    """

    requirements = Requirements(captions=True)  # the model must have a caption decoder (``model.caption``)

    def __init__(
        self, modalities: list[str], lambda_con: float = 1.0, lambda_cap: float = 2.0, label_smoothing: float = 0.0
    ):
        super().__init__(modalities)
        self.contrastive = ClipObjective(modalities)
        self.lambda_con = float(lambda_con)
        self.lambda_cap = float(lambda_cap)
        self.label_smoothing = float(label_smoothing)

    def forward(
        self, output: AlignmentOutput, logit_scale: Scale, logit_bias: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        cap = output.caption
        if cap is None:
            raise ConfigError("loss 'coca' needs caption targets: a captioning model (model.caption) and batches "
                              "that carry both the captioned modality and the text")
        out = self.contrastive(output, logit_scale)
        contrastive = out.pop("loss")
        total, count = _caption_ce_sum(cap.logits, cap.labels, cap.pad_id, self.label_smoothing)
        if is_distributed():
            count = count.clone()
            dist.all_reduce(count)
            total = total * world_size()
        caption = total / count.clamp(min=1)
        out["loss_contrastive"] = contrastive
        out["loss_caption"] = caption
        out["loss"] = self.lambda_con * contrastive + self.lambda_cap * caption
        return out
