"""Heads on top of modality towers: CoCa's attentional poolers and caption decoder, and batched generation."""
from .coca import CocaHead, CocaTextDecoder, OpenClipCoca, open_clip_coca
from .generation import generate
from .pooler import AttentionalPooler

__all__ = ["AttentionalPooler", "CocaHead", "CocaTextDecoder", "OpenClipCoca", "generate", "open_clip_coca"]
