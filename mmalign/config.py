"""Typed configuration: dataclasses loaded from a recipe YAML plus ``--set key=value`` overrides.

Unknown keys are rejected with the closest valid key suggested; required keys that are missing are named.
Modality sections are typed per modality kind (``ImageConfig``, ``TextConfig``, ...), registered by the modality
files through ``register_modality_config``.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import ConfigError, closest

MISSING_REQUIRED = "???"  # marker default for keys a recipe must set


@dataclass
class ModalityConfig:
    """What every modality section has: which tower, how it is projected, whether it trains."""

    kind: str = ""  # modality kind (registry key); defaults to the section name when that is a known kind
    tower: str = ""  # tower builder within the kind, e.g. "small_cnn", "open_clip", "timm", "hf"
    model: Optional[str] = None  # architecture name, hub name or local folder (tower-specific)
    pretrained: Optional[str] = None  # checkpoint: open_clip tag, local file; None = from scratch (or hub weights for hf)
    init: str = "pretrained"  # "pretrained" loads weights where the tower has them, "scratch" builds the architecture only
    tower_kwargs: dict = field(default_factory=dict)
    proj: str = "linear"  # "linear" | "mlp" | "none"
    proj_hidden: Optional[int] = None
    lock: bool = False  # LiT: freeze the tower
    unlocked_layers: int = 0  # with lock: keep the last N blocks trainable
    unlock_norms: bool = False  # with lock: keep normalisation layers trainable
    cache_frozen: bool = False  # cache a fully locked tower's features per distinct input (e.g. repeated captions)
    trust_remote_code: bool = False
    optional: bool = False  # samples may lack it: batches carry "<name>__present", the model a learned missing embedding


MODALITY_CONFIGS: dict[str, type[ModalityConfig]] = {}


def register_modality_config(kind: str, cls: type[ModalityConfig]) -> None:
    MODALITY_CONFIGS[kind] = cls


@dataclass
class LogitScaleConfig:
    init: Optional[float] = None  # multiplier s; default 1/0.07 (CLIP) or 10 (SigLIP)
    learnable: bool = True
    max: float = 100.0
    bias_init: Optional[float] = None  # SigLIP bias; default -10 when the loss needs a bias


@dataclass
class ModelConfig:
    modalities: dict[str, ModalityConfig] = field(default_factory=dict)
    embed_dim: int = 256
    logit_scale: LogitScaleConfig = field(default_factory=LogitScaleConfig)
    logit_bias: bool = False  # set automatically when the loss needs it
    nway_score: Optional[str] = None  # how a tuple of modalities scores a candidate (mip | volume | cosine); from the loss


@dataclass
class LossConfig:
    name: str = "clip"
    kwargs: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    train: str = MISSING_REQUIRED  # shard path(s): brace pattern "dir/train-{000000..000009}.tar", "::"-separated list
    batch_size: int = 64
    shuffle_buffer: int = 1000
    num_workers: int = 2
    resampled: bool = False  # sample shards with replacement (infinite stream) instead of epoch passes
    max_bad_fraction: float = 0.1  # stop when more than this fraction of samples is unusable


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    grad_accum: int = 1  # micro-batches per optimiser step (each micro-batch has its own negatives)
    grad_clip: Optional[float] = 1.0
    precision: str = "no"  # "no" | "fp16" | "bf16"
    device: str = "auto"  # "auto" | "cpu"
    checkpoint_every: int = 500
    keep_last: int = 2
    log_every: int = 10


@dataclass
class ZeroShotConfig:
    data: Optional[str] = None
    classes: Optional[str] = None  # file: one class name per line
    templates: Optional[str] = None  # file: one template per line with "{}" for the class name
    query: Optional[str] = None  # modality to classify, or several "a,b" (N-way); default: the first non-text one
    text: str = "text"


@dataclass
class RetrievalConfig:
    data: Optional[str] = None
    query: Optional[str] = None  # one modality, or several "a,b": N-way retrieval of the gallery from the tuple
    gallery: str = "text"


@dataclass
class EvalConfig:
    batch_size: int = 256
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)


@dataclass
class Config:
    run_dir: str = MISSING_REQUIRED
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------------- loading


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from nested dicts, checking keys and types; ``where`` names the position for errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'recipe'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown key {_join(where, key)!r}{closest(key, names)}")
        kwargs[key] = _convert(hints[key], value, _join(where, key))
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where)
    if tp is ModalityConfig:
        return _modality_from_dict(value, where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {k: _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _modality_from_dict(value: Any, where: str) -> ModalityConfig:
    from . import modalities  # noqa: F401  (registers the modality kinds and their configs)

    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    section = where.rsplit(".", 1)[-1]
    kind = value.get("kind") or section
    if kind not in MODALITY_CONFIGS:
        raise ConfigError(
            f"{where}: unknown modality kind {kind!r}{closest(kind, MODALITY_CONFIGS)}; "
            f"set 'kind' to one of: {', '.join(sorted(MODALITY_CONFIGS))}"
        )
    cfg = from_dict(MODALITY_CONFIGS[kind], {**value, "kind": kind}, where)
    return cfg


def to_dict(cfg: Any) -> Any:
    """Plain nested dicts/lists (for YAML/JSON), the inverse of ``from_dict``."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (value parsed as YAML) to a nested dict, creating sections as needed."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Load a recipe (YAML file), apply overrides, validate, and return a ``Config``."""
    data: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(loaded).__name__}")
        data.update(loaded)
    apply_overrides(data, overrides or [])
    cfg = from_dict(Config, data)
    validate(cfg, source=str(path) if path else "config")
    return cfg


def validate(cfg: Config, source: str = "config") -> None:
    """Check required keys, ranges and enums; raise ``ConfigError`` naming the key."""
    _require(cfg, source)
    if not cfg.model.modalities:
        raise ConfigError(f"{source}: model.modalities is required (e.g. image: {{tower: small_cnn}}, text: {{...}})")
    checks = [
        (cfg.model.embed_dim > 0, "model.embed_dim must be > 0"),
        (cfg.data.batch_size > 0, "data.batch_size must be > 0"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (0 <= cfg.data.max_bad_fraction <= 1, "data.max_bad_fraction must be in [0, 1]"),
        (cfg.train.steps > 0, "train.steps must be > 0"),
        (cfg.train.lr > 0 and math.isfinite(cfg.train.lr), "train.lr must be a positive number"),
        (cfg.train.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (cfg.train.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (cfg.train.checkpoint_every > 0, "train.checkpoint_every must be > 0"),
        (cfg.train.keep_last >= 1, "train.keep_last must be >= 1"),
        (cfg.train.precision in ("no", "fp16", "bf16"), "train.precision must be one of no, fp16, bf16"),
        (cfg.train.device in ("auto", "cpu"), "train.device must be 'auto' or 'cpu'"),
        (cfg.model.logit_scale.max > 0, "model.logit_scale.max must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source}: {message}")
    if cfg.model.nway_score is not None:
        from .eval.nway import NWAY_SCORES

        if cfg.model.nway_score not in NWAY_SCORES:
            raise ConfigError(f"{source}: model.nway_score must be one of {', '.join(sorted(NWAY_SCORES))}"
                              f"{closest(cfg.model.nway_score, NWAY_SCORES)}")
    for name, m in cfg.model.modalities.items():
        if m.proj not in ("linear", "mlp", "none"):
            raise ConfigError(f"{source}: model.modalities.{name}.proj must be linear, mlp or none, got {m.proj!r}")
        if m.init not in ("pretrained", "scratch"):
            raise ConfigError(f"{source}: model.modalities.{name}.init must be pretrained or scratch")


def _require(obj: Any, source: str, where: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value == MISSING_REQUIRED:
            raise ConfigError(f"{source}: missing required key {_join(where, f.name)!r}")
        if dataclasses.is_dataclass(value):
            _require(value, source, _join(where, f.name))
