"""CoCa on the modality side: which towers a caption decoder can read, and the head on the captioned modality.

With ``model.caption`` the captioned modality's adapter gets, instead of a projection, a ``heads.CocaHead`` on its
tower's tokens: a one-query pooler gives the embedding and an ``n_queries`` pooler the context the decoder reads. With
``n_queries`` 0 the tower pools itself (``forward_pooled_tokens``): the projection of its pooled output is the
embedding and its tokens, as they are, the context. ``coca`` below is ``{"context_dim", "n_queries", "n_heads"}``.
"""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from ..heads import CocaHead
from .registry import Modality


def check_context_tower(tower: nn.Module, modality: Modality, coca: dict) -> None:
    """Can this tower be the context of a caption decoder with these settings? Else a ConfigError saying why."""
    where = f"modality {modality.name!r}"
    if getattr(tower, "token_dim", None) is None:
        raise ConfigError(f"{where}: its {modality.cfg.tower} tower gives no token sequence (forward_tokens), "
                          f"so it cannot be the context of a caption decoder")
    if modality.cfg.cache_frozen:
        raise ConfigError(f"{where}: cache_frozen caches pooled features, but captioning reads the tower's "
                          f"tokens; turn it off")
    if modality.cfg.optional and coca["n_queries"] > 0:
        raise ConfigError(f"{where}: a modality read through a CoCa head cannot be optional")
    if coca["n_queries"] == 0:
        if not hasattr(tower, "forward_pooled_tokens"):
            raise ConfigError(f"{where}: model.caption.n_queries 0 uses the tower's own pooling, which its "
                              f"{modality.cfg.tower} tower lacks (forward_pooled_tokens); set n_queries >= 1")
        if tower.token_dim != coca["context_dim"]:
            raise ConfigError(f"{where}: model.caption.n_queries 0 passes the tower's {tower.token_dim}-wide "
                              f"tokens to a decoder that reads {coca['context_dim']}-wide context; set n_queries >= 1")


def coca_head(tower: nn.Module, embed_dim: int, coca: dict) -> CocaHead | None:
    """The head pooling the tower's tokens into embedding and context; None where the tower pools itself."""
    if coca["n_queries"] == 0:
        return None
    try:
        return CocaHead(tower.token_dim, embed_dim, **coca)
    except AssertionError as e:  # nn.MultiheadAttention: embed_dim must be divisible by num_heads
        raise ConfigError(f"model.caption: {e} (heads must divide the decoder width)") from None
