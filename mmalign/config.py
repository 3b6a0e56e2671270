"""Typed configuration: dataclasses loaded from a recipe YAML plus ``--set key=value`` overrides.

Unknown keys are rejected with the closest valid key suggested; required keys that are missing are named.
Modality sections are typed per modality kind (``ImageConfig``, ``TextConfig``, ...), the dataclasses of
``modality_config``: plain data, so loading a recipe imports no modality code.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from .errors import ConfigError, closest
from .modality_config import MODALITY_CONFIGS, ModalityConfig

MISSING_REQUIRED = "???"  # marker default for keys a recipe must set


@dataclass
class TemperatureScheduleConfig:
    """Temperature tau (s = 1/tau) from ``tau_start`` to ``tau_end`` over ``steps`` (default: train.steps)."""

    tau_start: float = 0.07
    tau_end: float = 0.01
    kind: str = "cosine"  # "cosine" | "linear" | "exponential" | "constant"
    steps: Optional[int] = None


@dataclass
class LogitScaleConfig:
    init: Optional[float] = None  # multiplier s; default 1/0.07 (CLIP) or 10 (SigLIP)
    learnable: bool = True  # false: s stays fixed at init
    max: float = 100.0
    bias_init: Optional[float] = None  # SigLIP bias; default -10 when the loss needs a bias
    schedule: Optional[TemperatureScheduleConfig] = None  # when set, s follows it (not learned, whatever learnable says)


@dataclass
class CaptionConfig:
    """CoCa: the ``text`` modality's tower is a caption decoder (``coca_decoder``) whose cross-attending half reads a
    context pooled from the ``context`` modality's tower tokens; that modality's embedding comes from the same
    tokens (attentional poolers of ``heads.CocaHead``). Train with ``loss.name: coca``."""

    context: str = MISSING_REQUIRED  # modality whose tower offers tokens (image, audio, ...): what is captioned
    text: str = "text"  # text modality whose tower is a caption decoder
    n_queries: int = 64  # learned queries of the caption pooler = context length the decoder attends to;
    #                      0: the tower's own tokens and pooled output as they are (open_clip CoCa ViTs)
    heads: int = 8  # attention heads of both poolers (must divide the decoder width)


@dataclass
class ModelConfig:
    modalities: dict[str, ModalityConfig] = field(default_factory=dict)
    embed_dim: int = 256
    logit_scale: LogitScaleConfig = field(default_factory=LogitScaleConfig)
    logit_bias: bool = False  # set for a run whose loss needs it (``build.resolve_model_config``)
    nway_score: Optional[str] = None  # how a tuple of modalities scores a candidate (mip | volume | cosine); from the loss
    caption: Optional[CaptionConfig] = None  # CoCa: contrastive + captioning


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
    resampled: bool = False  # draw shards with replacement (an epoch: as many draws as shards) instead of each once
    max_bad_fraction: float = 0.1  # stop when more than this fraction of samples is unusable (from 100 samples on)


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    grad_accum: int = 1  # micro-batches per optimiser step (each micro-batch has its own negatives)
    gradcache_chunk: Optional[int] = None  # GradCache: encode in chunks of this many rows, loss over the whole batch
    grad_clip: Optional[float] = 1.0  # max gradient norm; null: no clipping
    precision: str = "no"  # "no" | "fp16" | "bf16"
    compile: bool = False  # torch.compile the model (inductor); the first steps take longer while it compiles
    device: str = "auto"  # "auto" | "cpu"
    checkpoint_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    max_nonfinite_in_row: int = 20  # stop after this many consecutive steps with a non-finite loss or gradient


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
class DiagnosticsConfig:
    """Embedding-space diagnostics written at the end of every run (gap, alignment, uniformity, PCA plot)."""

    data: Optional[str] = None  # default: eval.retrieval.data, else eval.zeroshot.data, else data.train
    max_samples: int = 500


@dataclass
class GenerationConfig:
    """How captions are decoded (``mmalign.heads.generation.generate``)."""

    strategy: str = "greedy"  # "greedy" | "beam" | "sample"
    num_beams: int = 3
    max_length: Optional[int] = None  # most tokens generated after BOS; default: the text modality's max_length - 1
    min_length: int = 0
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0
    seed: int = 0  # sampling


@dataclass
class CaptionEvalConfig(GenerationConfig):
    data: Optional[str] = None  # shards (references from their text, class words from label.txt) or image files
    out: str = "captions.jsonl"  # relative to the run directory


@dataclass
class EvalConfig:
    batch_size: int = 256
    report_examples: int = 6  # retrieval queries shown in report.html with their top items
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    caption: CaptionEvalConfig = field(default_factory=CaptionEvalConfig)


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
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _modality_from_dict(value: Any, where: str) -> ModalityConfig:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    section = where.rsplit(".", 1)[-1]
    kind = value.get("kind") or section
    if kind not in MODALITY_CONFIGS:
        raise ConfigError(
            f"{where}: unknown modality kind {kind!r}{closest(kind, MODALITY_CONFIGS)}; "
            f"set 'kind' to one of: {', '.join(sorted(MODALITY_CONFIGS))}"
        )
    return from_dict(MODALITY_CONFIGS[kind], {**value, "kind": kind}, where)


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
    t, ls = cfg.train, cfg.model.logit_scale
    checks = [
        (cfg.run_dir.strip() != "", "run_dir must not be empty"),
        (cfg.seed >= 0, "seed must be >= 0"),
        (cfg.model.embed_dim > 0, "model.embed_dim must be > 0"),
        (cfg.data.batch_size > 0, "data.batch_size must be > 0"),
        (cfg.data.shuffle_buffer >= 0, "data.shuffle_buffer must be >= 0"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (0 <= cfg.data.max_bad_fraction <= 1, "data.max_bad_fraction must be in [0, 1]"),
        (t.steps > 0, "train.steps must be > 0"),
        (t.lr > 0 and math.isfinite(t.lr), "train.lr must be a positive number"),
        (t.weight_decay >= 0 and math.isfinite(t.weight_decay), "train.weight_decay must be >= 0"),
        (len(t.betas) == 2 and all(_number(b) and 0 <= b < 1 for b in t.betas),
         "train.betas must be two numbers in [0, 1)"),
        (t.eps > 0 and math.isfinite(t.eps), "train.eps must be a positive number"),
        (t.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (t.gradcache_chunk is None or t.gradcache_chunk > 0, "train.gradcache_chunk must be > 0"),
        (t.grad_clip is None or (t.grad_clip > 0 and math.isfinite(t.grad_clip)),
         "train.grad_clip must be a positive number or null"),
        (t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (t.checkpoint_every > 0, "train.checkpoint_every must be > 0"),
        (t.keep_last >= 1, "train.keep_last must be >= 1"),
        (t.log_every > 0, "train.log_every must be > 0"),
        (t.max_nonfinite_in_row >= 1, "train.max_nonfinite_in_row must be >= 1"),
        (t.precision in ("no", "fp16", "bf16"), "train.precision must be one of no, fp16, bf16"),
        (t.device in ("auto", "cpu"), "train.device must be 'auto' or 'cpu'"),
        (ls.max > 0 and math.isfinite(ls.max), "model.logit_scale.max must be a positive number"),
        (ls.init is None or (0 < ls.init <= ls.max), "model.logit_scale.init must be in (0, model.logit_scale.max]"),
        (ls.bias_init is None or math.isfinite(ls.bias_init), "model.logit_scale.bias_init must be a finite number"),
        (cfg.eval.diagnostics.max_samples >= 2, "eval.diagnostics.max_samples must be >= 2"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source}: {message}")
    for name, m in cfg.model.modalities.items():
        if m.proj not in ("linear", "mlp", "none"):
            raise ConfigError(f"{source}: model.modalities.{name}.proj must be linear, mlp or none, got {m.proj!r}")
        if m.init not in ("pretrained", "scratch"):
            raise ConfigError(f"{source}: model.modalities.{name}.init must be pretrained or scratch")
        if getattr(m, "long_text", None) == "windows" and cfg.train.gradcache_chunk:
            raise ConfigError(f"{source}: model.modalities.{name}.long_text: windows does not combine with "
                              f"train.gradcache_chunk (GradCache splits batches by rows, windows add rows)")
        if m.lora is not None and (m.lora.r <= 0 or not 0 <= m.lora.dropout < 1):
            raise ConfigError(f"{source}: model.modalities.{name}.lora needs r > 0 and 0 <= dropout < 1")
    cap = cfg.model.caption
    if cap is not None:
        for key in ("context", "text"):
            if getattr(cap, key) not in cfg.model.modalities:
                raise ConfigError(f"{source}: model.caption.{key} {getattr(cap, key)!r} is not one of "
                                  f"model.modalities ({', '.join(cfg.model.modalities)})")
        if cap.context == cap.text:
            raise ConfigError(f"{source}: model.caption.context and model.caption.text must differ")
        if cap.n_queries < 0 or cap.heads < 1:
            raise ConfigError(f"{source}: model.caption.n_queries must be >= 0 and model.caption.heads >= 1")
        if cfg.train.gradcache_chunk:
            raise ConfigError(f"{source}: model.caption does not combine with train.gradcache_chunk (GradCache "
                              f"encodes each modality alone; the caption decoder reads both at once)")
    validate_generation(cfg.eval.caption, lambda key: f"{source}: eval.caption.{key}")


def validate_generation(gen: GenerationConfig, name: Callable[[str], str]) -> None:
    """Check generation options; ``name(field)`` says how the error names a field (recipe key or CLI flag)."""
    checks = [
        (gen.strategy in ("greedy", "beam", "sample"), "strategy", "must be greedy, beam or sample"),
        (gen.num_beams >= 1, "num_beams", "must be >= 1"),
        (gen.max_length is None or gen.max_length >= 1, "max_length", "must be >= 1"),
        (gen.min_length >= 0, "min_length", "must be >= 0"),
        (gen.top_k >= 0, "top_k", "must be >= 0"),
        (0 < gen.top_p <= 1, "top_p", "must be in (0, 1]"),
        (gen.temperature > 0, "temperature", "must be > 0"),
        (gen.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
    ]
    for ok, key, rule in checks:
        if not ok:
            raise ConfigError(f"{name(key)} {rule}")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _require(obj: Any, source: str, where: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value == MISSING_REQUIRED:
            raise ConfigError(f"{source}: missing required key {_join(where, f.name)!r}")
        if dataclasses.is_dataclass(value):
            _require(value, source, _join(where, f.name))
