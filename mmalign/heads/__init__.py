"""Heads on top of modality towers: CoCa's attentional poolers and caption decoder, batched generation, and GRAM's
matching head."""
from .coca import CocaHead, CocaTextDecoder, OpenClipCoca, open_clip_coca
from .generation import generate
from .matching import MatchingHead
from .pooler import AttentionalPooler

__all__ = ["AttentionalPooler", "CocaHead", "CocaTextDecoder", "MatchingHead", "OpenClipCoca", "generate",
           "open_clip_coca"]
