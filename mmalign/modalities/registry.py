"""The modality interface and its two registries: kinds (``register_modality``) and their towers (``register_tower``).

A modality has two halves:

* ``Modality`` (CPU side, picklable, runs in DataLoader workers): decode bytes from a shard, train/eval
  transforms, collate a list of items into a batch, and (for text) tokenise.
* A tower (``nn.Module`` with an ``out_dim`` attribute, ``forward(batch) -> B x out_dim``) built from the spec it was
  registered with. A tower that can also give its token sequence (spatial positions, patches, frames) sets
  ``token_dim`` and defines ``forward_tokens(batch) -> (B x N x token_dim, mask B x N or None)``, mask True for real
  tokens; a CoCa caption head can then sit on that modality. One whose own pooling already makes caption tokens
  (open_clip's CoCa ViTs) may define ``forward_pooled_tokens(batch) -> (B x out_dim, tokens, mask)`` as well, for
  captioning models that use the tower's tokens as they are (``model.caption.n_queries: 0``). A caption decoder
  tower (the text side of CoCa) sets ``context_dim`` and defines ``caption(batch, context) -> (B x out_dim features,
  B x T x V logits)`` and ``step(tokens, context) -> B x V`` next-token logits.

Every tower is registered with a ``TowerSpec`` next to its class (as timm's ``register_model`` with its pretrained
config, or an HF model with its processor): how to build it, the preprocessing it implies (read from its checkpoint
where it has one), how each export format writes it and, through a kind's own spec class, what makes its inputs (a
text tower's tokenizer, an audio tower's features). Constructing the ``Modality`` resolves the spec once, before
anything is built: config fields the recipe left unset are filled from the tower's defaults, then the kind's, so the
config is complete and is what a saved model records. Adding a tower is one class and one ``register_tower`` call.

Collated inputs may hold several rows per item (the windows of a long caption or clip): they then carry ``OWNER``,
the item of each row, and the adapter averages an item's rows. A batch uses the same name for the captions of one
sample in evaluation: ``<name>__owner``.
"""
from __future__ import annotations

import inspect
import re
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping

import torch
from torch import nn

from ..bounds import check_bounds
from ..errors import ConfigError, closest
from ..modality_config import ModalityConfig, register_modality_config

OWNER = "owner"  # key of the row -> item index in collated inputs with several rows per item
UNSET = (None, "auto")  # config values that mean "the tower's (else the kind's) default"


def no_defaults(cfg: ModalityConfig) -> dict[str, Any]:
    return {}


@dataclass(frozen=True, kw_only=True)
class TowerSpec:
    """A registered tower: how it is built and what it needs around it.

    ``build``: the resolved modality config -> the tower. ``defaults``: the preprocessing the tower implies (read
    from its checkpoint where it has one: an HF processor, open_clip's preprocess config), as config fields; it
    fills only fields left unset, before anything is built. ``model``: what the config's ``model`` names for this
    tower (e.g. "an open_clip architecture name, e.g. ViT-B-32"); set when the tower needs one. ``export``: format
    -> a function of the built tower giving what that export format writes for it (see ``mmalign.export``).
    ``tower_kwargs``: the class or function the config's ``tower_kwargs`` go to; its parameters with a default are
    the keys a recipe may set, checked with their annotated types before anything is built (None where they pass on
    to a library, open_clip, timm or transformers, which checks them as it builds).
    """

    build: Callable[[Any], nn.Module]
    defaults: Callable[[Any], dict[str, Any]] = no_defaults
    model: str = ""
    export: Mapping[str, Callable[[nn.Module], Any]] = field(default_factory=dict)
    tower_kwargs: Callable[..., Any] | None = None


MODALITIES: dict[str, type["Modality"]] = {}
TOWERS: dict[str, dict[str, TowerSpec]] = {}  # kind -> tower name -> spec


class Modality:
    """CPU side of a modality. Subclasses set ``kind``, ``extensions``, ``config_class`` and override the hooks."""

    kind: ClassVar[str]
    extensions: ClassVar[tuple[str, ...]]  # shard member extensions this kind decodes
    file_extensions: ClassVar[tuple[str, ...]] = ()  # further files on disk it packs into members (``file_members``)
    config_class: ClassVar[type[ModalityConfig]] = ModalityConfig
    spec_class: ClassVar[type[TowerSpec]] = TowerSpec  # what its towers declare (a kind may ask for more)
    default_tower: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}  # config fields left unset that neither the recipe nor the tower set

    def __init__(self, name: str, cfg: ModalityConfig):
        self.name = name
        self.cfg = cfg
        self.resolve(cfg)
        check_bounds(cfg, lambda key: f"modality {name!r}: {key}")
        if cfg.optional and type(self).placeholder is Modality.placeholder:
            raise ConfigError(f"modality {name!r} cannot be optional: kind {self.kind!r} defines no placeholder() "
                              f"for absent items")

    @property
    def spec(self) -> TowerSpec:
        """The spec of this modality's tower (looked up, not held: specs hold functions, modalities get pickled)."""
        return TOWERS[self.kind][self.cfg.tower]

    def resolve(self, cfg: ModalityConfig) -> None:
        """Fill the fields of ``cfg`` left unset from its tower's spec, then the kind's defaults (before building)."""
        if not cfg.tower:
            cfg.tower = self.default_tower
        towers = TOWERS[self.kind]
        if cfg.tower not in towers:
            raise ConfigError(
                f"modality {self.name!r}: unknown {self.kind} tower {cfg.tower!r}{closest(cfg.tower, towers)}; "
                f"known: {', '.join(sorted(towers))}"
            )
        spec = towers[cfg.tower]
        if spec.model and not cfg.model:
            raise ConfigError(f"modality {self.name!r}: {self.kind} tower {cfg.tower} needs 'model' ({spec.model})")
        if spec.tower_kwargs is not None:
            with named_errors(self.name):
                check_kwargs(spec.tower_kwargs, cfg.tower_kwargs, f"{cfg.tower} tower_kwargs")
        with named_errors(self.name):
            tower_defaults = spec.defaults(cfg)
        for source in (tower_defaults, self.defaults):
            for key, value in source.items():
                if getattr(cfg, key) in UNSET:
                    setattr(cfg, key, value)

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
        """The tower; a ``tower_kwargs`` key its builder does not take (a library's tower) is a ``ConfigError``."""
        try:
            return self.spec.build(self.cfg)
        except TypeError as e:
            key = re.search(r"unexpected keyword argument '(\w+)'", str(e))
            if key is None or key[1] not in self.cfg.tower_kwargs:
                raise
            raise ConfigError(f"modality {self.name!r}: {self.cfg.tower} tower_kwargs: {key[1]!r} is not an option "
                              f"of the tower ({e})") from None

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

    def save_hf_preprocessor(self, directory: Path) -> dict:
        """``mmalign export --format hf``: write the transformers preprocessor doing what this modality does in
        evaluation (tokenizer, image processor, feature extractor) to ``directory``; returns its settings."""
        return {}


@contextmanager
def named_errors(name: str) -> Iterator[None]:
    """A ``ConfigError`` raised inside (by a spec, a tokenizer, a feature extractor) gets modality ``name`` in front."""
    try:
        yield
    except ConfigError as e:
        if str(e).startswith("modality "):
            raise
        raise ConfigError(f"modality {name!r}: {e}") from None


SIMPLE_TYPES = {int: "an integer", float: "a number", bool: "true/false", str: "a string", tuple: "a list"}


def check_kwargs(fn: Callable[..., Any], kwargs: Mapping[str, Any], where: str) -> None:
    """Check ``kwargs`` against the parameters of ``fn`` that have a default (those a caller sets, the others being
    filled by the builder): an unknown key is an error naming the closest one, a value of the wrong simple type
    (int, float, bool, str, tuple; as annotated) an error naming the type."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in params.items() if p.default is not p.empty and p.kind is not p.VAR_POSITIONAL]
    try:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except (NameError, TypeError):  # annotations that do not resolve: keys only
        hints = {}
    for key, value in kwargs.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}{closest(key, allowed)}; the tower takes "
                              f"{', '.join(allowed) or 'none'}")
        wanted = hints.get(key)
        if wanted in SIMPLE_TYPES and not is_a(value, wanted):
            raise ConfigError(f"{where}.{key} must be {SIMPLE_TYPES[wanted]}, got {value!r}")


def is_a(value: Any, wanted: type) -> bool:
    """``isinstance`` as a recipe means it: an int is a number, a list a tuple, a bool no number."""
    if wanted in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, {float: (int, float), tuple: (list, tuple)}.get(wanted, wanted))


def register_modality(cls: type[Modality]) -> type[Modality]:
    """Class decorator: register a modality kind (and its config class)."""
    MODALITIES[cls.kind] = cls
    TOWERS.setdefault(cls.kind, {})
    register_modality_config(cls.kind, cls.config_class)
    return cls


def register_tower(kind: str, name: str, spec: TowerSpec) -> TowerSpec:
    """Register tower ``name`` of modality ``kind`` (``tower: name`` in a recipe) with its spec."""
    if kind not in MODALITIES:
        raise ValueError(f"register_tower: unknown modality kind {kind!r}; register the kind first")
    wanted = MODALITIES[kind].spec_class
    if not isinstance(spec, wanted):
        raise TypeError(f"register_tower: a {kind} tower needs a {wanted.__name__}, got {type(spec).__name__}")
    TOWERS[kind][name] = spec
    return spec


def build_modality(name: str, cfg: ModalityConfig) -> Modality:
    if cfg.kind not in MODALITIES:
        raise ConfigError(f"unknown modality kind {cfg.kind!r}{closest(cfg.kind, MODALITIES)}")
    return MODALITIES[cfg.kind](name, cfg)


def model_and_weights(cfg: ModalityConfig) -> tuple[str, str | None]:
    """The architecture a tower builder builds (``cfg.model``) and its weights (None when built from scratch)."""
    return cfg.model, cfg.pretrained if cfg.init == "pretrained" else None


def check_context_length(cfg: ModalityConfig, positions: int | None, tower: str) -> None:
    """A text config's ``max_length`` beyond its model's ``positions`` (None: no limit) is a one-line error, not
    an index error at the first long caption."""
    if positions is not None and cfg.max_length > positions:
        raise ConfigError(f"max_length {cfg.max_length} exceeds the {positions} text positions of {tower} "
                          f"{cfg.model!r}; set max_length <= {positions}")
