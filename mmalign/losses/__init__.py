"""Alignment objectives: pure functions (the stable API) and registered loss modules for recipes."""
from .pairwise import clip_loss, siglip_loss
from .registry import LOSSES, build_loss, register_loss
from . import objectives  # noqa: F401  (registers the built-in objectives)

__all__ = ["clip_loss", "siglip_loss", "LOSSES", "build_loss", "register_loss"]
from .multimodal import gram_loss, gram_volume, symile_loss
from . import multimodal  # noqa: F401,E402  (registers the symile and gram objectives)

__all__ += ["symile_loss", "gram_volume", "gram_loss"]
