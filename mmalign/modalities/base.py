"""The modality interface and the adapter that turns any tower into normalised embeddings.

A modality has two halves:

* ``Modality`` (CPU side, picklable, runs in DataLoader workers): decode bytes from a shard, train/eval
  transforms, collate a list of items into a batch, and (for text) tokenise.
* A tower (``nn.Module`` with an ``out_dim`` attribute, ``forward(batch) -> B x out_dim``) built by a builder from
  the modality's tower registry. A tower that can also give its token sequence (spatial positions, patches,
  frames) sets ``token_dim`` and defines ``forward_tokens(batch) -> (B x N x token_dim, mask B x N or None)``, mask
  True for real tokens; a CoCa caption head can then sit on that modality. One whose own pooling already makes
  caption tokens (open_clip's CoCa ViTs) may define ``forward_pooled_tokens(batch) -> (B x out_dim, tokens, mask)``
  as well, for captioning models that use the tower's tokens as they are (``model.caption.n_queries: 0``).
  A caption decoder tower (the text side of CoCa) sets ``context_dim`` and defines ``caption(batch, context) ->
  (B x out_dim features, B x T x V logits)`` and ``step(tokens, context) -> B x V`` next-token logits.

``ModalityAdapter`` wraps a tower with a projection head to the shared dimension (or, for the captioned modality of
a CoCa model, with ``heads.CocaHead`` on the tower's tokens), applies LiT-style locking or LoRA, pools sliding
windows of one item and caches a frozen tower's outputs on request. Nothing here knows which modality it serves.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraConfig, ModalityConfig, register_modality_config, to_dict
from ..errors import ConfigError, closest

log = logging.getLogger(__name__)

MODALITIES: dict[str, type["Modality"]] = {}
TowerBuilder = Callable[[ModalityConfig], nn.Module]


class Modality:
    """CPU side of a modality. Subclasses set ``kind``, ``extensions``, ``config_class`` and override the hooks."""

    kind: ClassVar[str]
    extensions: ClassVar[tuple[str, ...]]  # shard member extensions this kind decodes
    file_extensions: ClassVar[tuple[str, ...]] = ()  # further files on disk it packs into members (``file_members``)
    config_class: ClassVar[type[ModalityConfig]] = ModalityConfig
    towers: ClassVar[dict[str, TowerBuilder]]
    default_tower: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}  # config fields left None that neither the recipe nor the tower set

    def __init__(self, name: str, cfg: ModalityConfig):
        self.name = name
        self.cfg = cfg
        if not cfg.tower:
            cfg.tower = self.default_tower
        if cfg.tower not in self.towers:
            raise ConfigError(
                f"modality {name!r}: unknown {self.kind} tower {cfg.tower!r}{closest(cfg.tower, self.towers)}; "
                f"known: {', '.join(sorted(self.towers))}"
            )
        if cfg.optional and type(self).placeholder is Modality.placeholder:
            raise ConfigError(f"modality {name!r} cannot be optional: kind {self.kind!r} defines no placeholder() "
                              f"for absent items")

    @classmethod
    def file_members(cls, path: Path) -> dict[str, bytes]:
        """A file on disk -> shard members (extension -> bytes); by default the file itself, as it is."""
        return {path.suffix.lower().lstrip("."): path.read_bytes()}

    def decode(self, data: bytes, ext: str) -> Any:
        """Bytes of one shard member -> item. Raise ``DataError`` with the reason for unusable input."""
        raise NotImplementedError

    def decode_member(self, sample: dict, key: str) -> Any:
        """The item held by member ``key`` of a raw sample; kinds whose items span members (npy + json) override."""
        return self.decode(sample[key], key.rsplit(".", 1)[-1])

    def transform(self, item: Any, train: bool) -> Any:
        return item

    def collate(self, items: list) -> Any:
        return torch.stack(items)

    def prepare(self) -> None:
        """Build what decoding and collating create lazily (e.g. a tokenizer) in this process. The data pipeline
        calls it before starting DataLoader workers, so that forked workers inherit it rather than each building
        its own at every pass."""

    def placeholder(self, train: bool) -> Any:
        """The item collated in place of an absent one (samples lacking an ``optional`` modality).

        Shaped like ``transform``'s output, so it collates with real items and is a valid tower input; its embedding
        is never used (the model substitutes its learned missing embedding for absent rows). Deterministic (no RNG):
        zeros or silence of the item's shape. A kind that does not define it cannot be optional.
        """
        raise NotImplementedError

    def build_tower(self) -> nn.Module:
        return self.towers[self.cfg.tower](self.cfg)

    def adopt_tower_defaults(self, tower: nn.Module) -> None:
        """Fill config fields the recipe left unset (None): first from ``tower.preprocess`` (what the checkpoint says:
        an HF processor, open_clip's preprocess config), then from the kind's ``defaults``. The saved config then
        records concrete values, so a reloaded model preprocesses exactly as the trained one."""
        for source in (getattr(tower, "preprocess", {}), self.defaults):
            for key, value in source.items():
                if hasattr(self.cfg, key) and getattr(self.cfg, key) is None:
                    setattr(self.cfg, key, value)

    def save_assets(self, tower: nn.Module, directory: Path) -> dict:
        """Write what is needed to rebuild the tower without its original source (tokenizer, HF config).

        Towers with a ``save_config(directory)`` method (HF towers) write their config (and processor) there.
        Returns updates to this modality's config in the saved model (paths relative to the model folder).
        """
        if not hasattr(tower, "save_config"):
            return {}
        directory.mkdir(parents=True, exist_ok=True)
        tower.save_config(directory)
        return {"model": f"./{directory.name}"}


def register_modality(cls: type[Modality]) -> type[Modality]:
    MODALITIES[cls.kind] = cls
    register_modality_config(cls.kind, cls.config_class)
    return cls


def register_tower(modality_cls: type[Modality], name: str) -> Callable[[TowerBuilder], TowerBuilder]:
    def add(fn: TowerBuilder) -> TowerBuilder:
        modality_cls.towers[name] = fn
        return fn

    return add


def build_modality(name: str, cfg: ModalityConfig) -> Modality:
    if cfg.kind not in MODALITIES:
        raise ConfigError(f"unknown modality kind {cfg.kind!r}{closest(cfg.kind, MODALITIES)}")
    return MODALITIES[cfg.kind](name, cfg)


def model_and_weights(cfg: ModalityConfig, example: str) -> tuple[str, str | None]:
    """The architecture a tower builder needs (``cfg.model``) and its weights (None when built from scratch)."""
    if not cfg.model:
        raise ConfigError(f"{cfg.kind} tower {cfg.tower} needs 'model' ({example})")
    return cfg.model, cfg.pretrained if cfg.init == "pretrained" else None


def create_open_clip(model_name: str, pretrained: str | None, **kwargs) -> nn.Module:
    """An open_clip model by architecture name; ``pretrained`` is a tag (network) or a local checkpoint file."""
    import open_clip

    try:
        return open_clip.create_model(model_name, pretrained=pretrained, **kwargs)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        raise ConfigError(f"open_clip model {model_name!r} (pretrained={pretrained!r}): {e}") from None


# --------------------------------------------------------------------------------------------------- tower helpers


def sinusoidal_positions(length: int, dim: int, device=None) -> torch.Tensor:
    """length x dim sine/cosine position codes (Vaswani et al. 2017)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    out = torch.zeros(length, dim, device=device)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return out


# --------------------------------------------------------------------------------------------------- adapter

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)


def tower_blocks(tower: nn.Module) -> nn.Module | None:
    """The tower's stack of blocks (transformer layers, CNN stages).

    A tower may name it ``blocks``; otherwise it is the ``ModuleList``/``Sequential`` of two or more children of one
    type (so an MLP's Linear-GELU-Linear never qualifies) holding the most parameters.
    """
    if isinstance(getattr(tower, "blocks", None), (nn.ModuleList, nn.Sequential)):
        return tower.blocks
    best, best_size = None, 0
    for module in tower.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 1:
            if len({type(child) for child in module}) == 1:
                size = sum(p.numel() for p in module.parameters())
                if size > best_size:
                    best, best_size = module, size
    return best


def lock_tower(tower: nn.Module, unlocked_layers: int = 0, unlock_norms: bool = False) -> None:
    """LiT locking: freeze every parameter, then unfreeze the last ``unlocked_layers`` blocks and/or all norms."""
    for p in tower.parameters():
        p.requires_grad_(False)
    unlock(tower, unlocked_layers, unlock_norms)


def unlock(tower: nn.Module, unlocked_layers: int = 0, unlock_norms: bool = False) -> None:
    """Make the last ``unlocked_layers`` blocks and/or all normalisation layers trainable."""
    if unlocked_layers > 0:
        blocks = tower_blocks(tower)
        if blocks is None:
            raise ConfigError(f"cannot unlock {unlocked_layers} layers: {type(tower).__name__} has no block list")
        for block in list(blocks)[-unlocked_layers:]:
            for p in block.parameters():
                p.requires_grad_(True)
    if unlock_norms:
        for module in tower.modules():
            if isinstance(module, NORM_TYPES):
                for p in module.parameters():
                    p.requires_grad_(True)


def default_lora_targets(tower: nn.Module) -> list[str]:
    """Attention and MLP of every block: the block stack's ``nn.Linear`` layers and ``nn.MultiheadAttention``
    modules (peft adapts an MHA's in- and out-projections itself; its ``out_proj`` is never called directly)."""
    blocks = tower_blocks(tower)
    if blocks is None:
        raise ConfigError(f"LoRA: {type(tower).__name__} has no block list; name lora.target_modules")
    prefix = next(name for name, module in tower.named_modules() if module is blocks)
    inside_mha = {f"{name}.out_proj" for name, m in blocks.named_modules() if isinstance(m, nn.MultiheadAttention)}
    targets = [
        f"{prefix}.{name}" for name, m in blocks.named_modules()
        if isinstance(m, nn.MultiheadAttention) or (isinstance(m, nn.Linear) and name not in inside_mha)
    ]
    if not targets:
        raise ConfigError(f"LoRA: no linear or attention layers in the blocks of {type(tower).__name__}; "
                          f"name lora.target_modules")
    return targets


def add_lora(tower: nn.Module, spec: LoraConfig) -> nn.Module:
    """Wrap ``tower`` in a peft ``LoraModel``: its own weights frozen, only the low-rank adapters trainable.

    ``merge_lora`` folds the adapters back into the weights (exactly the same function, plain modules again).
    """
    import peft

    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                             target_modules=spec.target_modules or default_lora_targets(tower))
    try:
        return peft.LoraModel(tower, config, "default")
    except ValueError as e:
        raise ConfigError(f"LoRA on {type(tower).__name__}: {str(e).splitlines()[0]}") from None


def merge_lora(tower: nn.Module) -> nn.Module:
    """The tower with its LoRA adapters merged into the weights (peft ``merge_and_unload``); others unchanged."""
    import peft

    return tower.merge_and_unload() if isinstance(tower, peft.LoraModel) else tower


def pool_windows(features: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Mean of the feature rows that belong to the same item (``owner[i]`` = item of row i, items 0..n-1)."""
    n = int(owner.max()) + 1
    sums = features.new_zeros(n, features.shape[1]).index_add_(0, owner, features)
    counts = torch.bincount(owner, minlength=n).clamp(min=1).to(features.dtype)
    return sums / counts[:, None]


def build_projection(kind: str, in_dim: int, out_dim: int, hidden: int | None = None) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == "mlp":
        hidden = hidden or max(in_dim, out_dim)
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
    if kind == "none":
        if in_dim != out_dim:
            raise ConfigError(f"proj: none needs the tower's output ({in_dim}) to equal embed_dim ({out_dim})")
        return nn.Identity()
    raise ConfigError(f"unknown projection {kind!r}; use linear, mlp or none")


def inputs_to(inputs: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """A modality's collated inputs (a tensor, or a dict of tensors such as token ids and masks) on ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=non_blocking)
    return {k: v.to(device, non_blocking=non_blocking) for k, v in inputs.items()}


def _rows(inputs: Any, index: torch.Tensor) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    return {k: v[index] for k, v in inputs.items()}


def _items(inputs: Any, index: torch.Tensor) -> Any:
    """Items ``index`` (ascending) of collated inputs: their rows, or with ``window_owner`` their windows (renumbered)."""
    owner = inputs.get("window_owner") if isinstance(inputs, dict) else None
    if owner is None:
        return _rows(inputs, index)
    keep = torch.isin(owner, index)
    renumber = torch.full((int(owner.max()) + 1,), -1, dtype=torch.long, device=owner.device)
    renumber[index] = torch.arange(len(index), device=owner.device)
    return {**{k: v[keep] for k, v in inputs.items() if k != "window_owner"}, "window_owner": renumber[owner[keep]]}


def _place(values: torch.Tensor, index: torch.Tensor, present: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """B x D: row ``index[i]`` holds ``values[i]`` where ``present``; every absent row holds ``fill``."""
    placed = values.new_zeros(present.shape[0], values.shape[1]).index_copy(0, index, values)
    return torch.where(present[:, None], placed, fill.to(values.dtype))


def _row_keys(inputs: Any) -> list[bytes]:
    tensors = [inputs] if isinstance(inputs, torch.Tensor) else [inputs[k] for k in sorted(inputs)]
    flat = [t.detach().reshape(t.shape[0], -1).cpu().numpy() for t in tensors]
    return [b"".join(f[i].tobytes() for f in flat) for i in range(flat[0].shape[0])]


# Frozen-feature caches of this process, one per distinct frozen tower (see ``frozen_tower_fingerprint``).
_FROZEN_CACHES: dict[str, OrderedDict] = {}


def frozen_tower_fingerprint(cfg: ModalityConfig, tower: nn.Module) -> str:
    """Hash of a tower's modality config and weights: equal fingerprints compute the same features (in eval mode)."""
    h = hashlib.blake2b(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode(), digest_size=16)
    for name, t in sorted(tower.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_token_tower(tower: nn.Module, modality: Modality, coca: dict) -> None:
    """Can this tower be the context of a caption decoder with these settings? Else a ConfigError saying why."""
    where = f"modality {modality.name!r}"
    if getattr(tower, "token_dim", None) is None:
        raise ConfigError(f"{where}: its {modality.cfg.tower} tower gives no token sequence (forward_tokens), "
                          f"so it cannot be the context of a caption decoder")
    if modality.cfg.cache_frozen:
        raise ConfigError(f"{where}: cache_frozen caches pooled features, but captioning reads the tower's "
                          f"tokens; turn it off")
    if coca["n_queries"] == 0:
        if not hasattr(tower, "forward_pooled_tokens"):
            raise ConfigError(f"{where}: model.caption.n_queries 0 uses the tower's own pooling, which its "
                              f"{modality.cfg.tower} tower lacks (forward_pooled_tokens); set n_queries >= 1")
        if tower.token_dim != coca["context_dim"]:
            raise ConfigError(f"{where}: model.caption.n_queries 0 passes the tower's {tower.token_dim}-wide "
                              f"tokens to a decoder that reads {coca['context_dim']}-wide context; set n_queries >= 1")


class ModalityAdapter(nn.Module):
    """Tower + projection head -> L2-normalised embeddings in the shared space.

    An input dict may carry ``window_owner`` (several windows of one long item, e.g. a long caption): the tower
    encodes every window and the item's feature is the mean over its windows.

    With ``coca`` (``{"context_dim", "n_queries", "n_heads"}``) the head is instead a ``CocaHead`` on the tower's
    tokens: its one-query pooler gives the embedding and its ``n_queries`` pooler the context a caption decoder
    reads (``embed_with_context``). With ``n_queries`` 0 the tower pools itself: the embedding is its pooled output
    through the projection, the context its tokens as they are (``forward_pooled_tokens``, one pass).

    An ``optional`` modality also has a learned missing embedding (Symile, Saporta et al. 2024): items whose presence
    flag is False get it instead of the tower's output, so every row has an embedding and the objectives can either
    contrast it like any other (``missing="learned"``) or drop those rows (``missing="drop"``).
    """

    def __init__(self, modality: Modality, embed_dim: int, cache_size: int = 200_000, coca: dict | None = None):
        super().__init__()
        cfg = modality.cfg
        self.modality_cfg = cfg
        tower = modality.build_tower()
        modality.adopt_tower_defaults(tower)
        self.proj, self.coca_head = None, None
        if coca is not None:
            _check_token_tower(tower, modality, coca)
        if coca is None or coca["n_queries"] == 0:
            self.proj = build_projection(cfg.proj, tower.out_dim, embed_dim, cfg.proj_hidden)
        else:
            from ..heads import CocaHead

            try:
                self.coca_head = CocaHead(tower.token_dim, embed_dim, **coca)
            except AssertionError as e:  # nn.MultiheadAttention: embed_dim must be divisible by num_heads
                raise ConfigError(f"model.caption: {e} (heads must divide the decoder width)") from None
        self.fully_locked = cfg.lock and cfg.lora is None and cfg.unlocked_layers == 0 and not cfg.unlock_norms
        if cfg.lora is not None:
            tower = add_lora(tower, cfg.lora)
            unlock(tower, cfg.unlocked_layers, cfg.unlock_norms)
        elif cfg.lock:
            lock_tower(tower, cfg.unlocked_layers, cfg.unlock_norms)
        self.tower = tower
        self.missing = nn.Parameter(F.normalize(torch.randn(embed_dim), dim=0)) if cfg.optional else None
        if self.missing is not None and self.coca_head is not None:
            raise ConfigError(f"modality {modality.name!r}: a modality read through a CoCa head cannot be optional")
        self.cache_frozen = cfg.cache_frozen and self.fully_locked
        self._cache: OrderedDict[bytes, torch.Tensor] | None = None  # chosen at first use, once weights are loaded
        self._cache_size = cache_size

    def train(self, mode: bool = True) -> "ModalityAdapter":
        super().train(mode)
        if self.fully_locked:
            self.tower.eval()  # frozen towers keep eval behaviour (dropout off, norm statistics fixed)
        return self

    def tower_features(self, inputs: Any) -> torch.Tensor:
        owner = inputs.get("window_owner") if isinstance(inputs, dict) else None
        if owner is not None:
            inputs = {k: v for k, v in inputs.items() if k != "window_owner"}
        if not self.fully_locked:
            features = self.tower(inputs)
        else:
            with torch.no_grad():
                features = self._cached_features(inputs) if self.cache_frozen else self.tower(inputs)
        return features if owner is None else pool_windows(features, owner)

    def tower_tokens(self, inputs: Any, pooled: bool = False) -> tuple:
        """``tower.forward_tokens`` (or ``forward_pooled_tokens``), without gradient for a locked tower."""
        fn = self.tower.forward_pooled_tokens if pooled else self.tower.forward_tokens
        if not self.fully_locked:
            return fn(inputs)
        with torch.no_grad():
            return fn(inputs)

    def _cached_features(self, inputs: Any) -> torch.Tensor:
        """Features per distinct input, cached; the cache is shared by every adapter of this process whose frozen
        tower is identical (same config and weights), so repeated runs (seeds, comparisons) encode each input once."""
        if self._cache is None:
            device = next(self.tower.parameters()).device
            key = f"{frozen_tower_fingerprint(self.modality_cfg, self.tower)}:{device}"
            self._cache = _FROZEN_CACHES.setdefault(key, OrderedDict())
        keys = _row_keys(inputs)
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            unique = list(dict.fromkeys(keys[i] for i in missing))
            first = [keys.index(k) for k in unique]
            feats = self.tower(_rows(inputs, torch.tensor(first)))
            for k, f in zip(unique, feats):
                self._cache[k] = f.detach().float()  # one dtype whether or not a run uses autocast
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return torch.stack([self._cache[k] for k in keys])

    def forward(
        self, inputs: Any, return_features: bool = False, present: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalised embeddings; with ``return_features`` also the tower's output before projection (same pass).

        With ``present`` (one flag per item) and a missing embedding (``optional`` modality), absent items get the
        learned missing embedding (and zero features). The tower sees only the present items, so placeholders never
        enter normalisation statistics; with none present it still runs on one placeholder whose output is
        discarded, so every parameter stays in the autograd graph (as DistributedDataParallel requires).
        """
        if self.coca_head is not None:
            if return_features:
                raise ConfigError("a tower read through a CoCa head gives tokens, not pooled features to return")
            return F.normalize(self.coca_head.embed(*self.tower_tokens(inputs)), dim=-1)
        index = None
        if self.missing is not None and present is not None:
            present = present.to(device=self.missing.device, dtype=torch.bool)
            index = present.nonzero().squeeze(1) if bool(present.any()) else present.new_zeros(1, dtype=torch.long)
            inputs = _items(inputs, index)
        features = self.tower_features(inputs)
        embeddings = F.normalize(self.proj(features), dim=-1)
        if index is not None:
            embeddings = _place(embeddings, index, present, F.normalize(self.missing, dim=0))
            features = _place(features, index, present, features.new_zeros(()))
        return (embeddings, features) if return_features else embeddings

    def embed_with_context(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised embedding B x D, caption context B x N x context_dim) from one pass of the tower."""
        if self.coca_head is None:  # the tower pools itself
            pooled, tokens, _ = self.tower_tokens(inputs, pooled=True)
            return F.normalize(self.proj(pooled), dim=-1), tokens
        out = self.coca_head(*self.tower_tokens(inputs))
        return F.normalize(out["embedding"], dim=-1), out["context"]

    def caption(self, inputs: Any, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption decoder towers: (normalised text embedding B x D, logits B x T x V) in one pass."""
        features, logits = self.tower.caption(inputs, context)
        return F.normalize(self.proj(features), dim=-1), logits
