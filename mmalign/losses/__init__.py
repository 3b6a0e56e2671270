"""Alignment objectives: pure functions (the stable API) and registered loss modules for recipes."""
from .pairwise import clip_loss, siglip_loss
from .registry import LOSSES, build_loss, register_loss
from . import objectives  # noqa: F401  (registers the built-in objectives)

__all__ = ["clip_loss", "siglip_loss", "LOSSES", "build_loss", "register_loss"]
from .chunked import chunked_clip_loss, chunked_siglip_loss  # noqa: E402  (also registers chunked_clip/_siglip)

__all__ += ["chunked_clip_loss", "chunked_siglip_loss"]
