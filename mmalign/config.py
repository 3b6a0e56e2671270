"""Typed configuration: dataclasses loaded from a recipe YAML plus ``--set key=value`` overrides.

Unknown keys are rejected with the closest valid key suggested; required keys that are missing are named.
Modality sections are typed per modality kind (``ImageConfig``, ``TextConfig``, ...), the dataclasses of
``modality_config``: plain data, so loading a recipe imports no modality code.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from .bounds import bounded, check_bounds
from .errors import ConfigError, closest
from .modality_config import MODALITY_CONFIGS, OUTPUT_NORMS, ModalityConfig

MISSING_REQUIRED = "???"  # marker default for keys a recipe must set


@dataclass
class TemperatureScheduleConfig:
    """Temperature tau (s = 1/tau) from ``tau_start`` to ``tau_end`` over ``steps`` (default: train.steps)."""

    tau_start: float = bounded(0.07, gt=0)
    tau_end: float = bounded(0.01, gt=0)
    kind: str = "cosine"  # "cosine" | "linear" | "exponential" | "constant"
    steps: Optional[int] = bounded(None, ge=1)


LOGIT_SCALE_LEARN = ("log_scale", "temperature")


@dataclass
class LogitScaleConfig:
    init: Optional[float] = bounded(None, gt=0)  # multiplier s; default 1/0.07 (CLIP) or 10 (SigLIP)
    learnable: bool = True  # false: s stays fixed at init
    learn: str = "log_scale"  # what is learned: "log_scale" (CLIP, s = exp(w)) | "temperature" (GRAM's code, s = 1/tau)
    max: Optional[float] = bounded(100.0, gt=0)  # s is kept <= max; null: uncapped (Symile's code)
    bias_init: Optional[float] = bounded(None)  # SigLIP bias; default -10 when the loss needs a bias
    schedule: Optional[TemperatureScheduleConfig] = None  # when set, s follows it (not learned, whatever learnable says)


@dataclass
class CaptionConfig:
    """CoCa: the ``text`` modality's tower is a caption decoder (``coca_decoder``) whose cross-attending half reads a
    context pooled from the ``context`` modality's tower tokens; that modality's embedding comes from the same
    tokens (attentional poolers of ``heads.CocaHead``). Train with ``loss.name: coca``."""

    context: str = MISSING_REQUIRED  # modality whose tower offers tokens (image, audio, ...): what is captioned
    text: str = "text"  # text modality whose tower is a caption decoder
    n_queries: int = bounded(64, ge=0)  # learned queries of the caption pooler = context length the decoder attends to;
    #                      0: the tower's own tokens and pooled output as they are (open_clip CoCa ViTs)
    heads: int = bounded(8, ge=1)  # attention heads of both poolers (must divide the decoder width)


@dataclass
class MatchingConfig:
    """A matching head (GRAM's data-anchor matching, ``heads.MatchingHead``) scoring whether a tuple of embeddings
    belongs together. Trained by a loss with a matching term (``gram`` with ``itm_ratio > 0``), which also fills
    ``modalities``; used by ``mmalign eval retrieval --rerank K``."""

    modalities: list = field(default_factory=list)  # the order the head reads its inputs in (the anchor first)
    hidden: Optional[int] = bounded(None, ge=1)  # hidden width; default: the concatenated input's width


@dataclass
class ModelConfig:
    modalities: dict[str, ModalityConfig] = field(default_factory=dict)
    embed_dim: int = bounded(256, ge=1)
    logit_scale: LogitScaleConfig = field(default_factory=LogitScaleConfig)
    logit_bias: bool = False  # set for a run whose loss needs it (``build.resolve_model_config``)
    nway_score: Optional[str] = None  # how a tuple of modalities scores a candidate (mip | volume | cosine); from the loss
    caption: Optional[CaptionConfig] = None  # CoCa: contrastive + captioning
    matching: Optional[MatchingConfig] = None  # GRAM's data-anchor matching head; set for a loss that trains one


@dataclass
class LossConfig:
    name: str = "clip"
    kwargs: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    train: str = MISSING_REQUIRED  # shard path(s): brace pattern "dir/train-{000000..000009}.tar", "::"-separated list
    batch_size: int = bounded(64, ge=1)
    shuffle_buffer: int = bounded(1000, ge=0)
    num_workers: int = bounded(2, ge=0)
    resampled: bool = False  # draw shards with replacement (an epoch: as many draws as shards) instead of each once
    # stop when more than this fraction of samples is unusable (from 100 samples on)
    max_bad_fraction: float = bounded(0.1, ge=0, le=1)


@dataclass
class FsdpConfig:
    """Fully sharded data parallel (PyTorch FSDP2, ``fully_shard``, through Accelerate's
    ``FullyShardedDataParallelPlugin``): each process holds a shard of the parameters, gradients and optimiser state,
    for towers that do not fit one device. Each tower's blocks are sharded as units
    (``AlignmentModel._no_split_modules``). GPUs (or other accelerators) only: Accelerate runs CPU processes with
    DistributedDataParallel."""

    reshard_after_forward: bool = True  # free gathered parameters after each block's forward (ZeRO-3), or keep them
    cpu_offload: bool = False  # keep the sharded parameters and optimiser state in CPU memory
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass


@dataclass
class TrainConfig:
    steps: int = bounded(1000, ge=1)
    lr: float = bounded(1e-3, gt=0)
    weight_decay: float = bounded(0.1, ge=0)
    betas: tuple = bounded((0.9, 0.98), ge=0, lt=1, length=2)
    eps: float = bounded(1e-6, gt=0)
    warmup_steps: int = bounded(100, ge=0)
    grad_accum: int = bounded(1, ge=1)  # micro-batches per optimiser step (each micro-batch has its own negatives)
    # GradCache: encode in chunks of this many rows, loss over the whole batch
    gradcache_chunk: Optional[int] = bounded(None, ge=1)
    grad_clip: Optional[float] = bounded(1.0, gt=0)  # max gradient norm; null: no clipping
    precision: str = "no"  # "no" | "fp16" | "bf16"
    compile: bool = False  # torch.compile the model (inductor); the first steps take longer while it compiles
    # convolution weights in channels-last memory format (faster convolutions: ResNet-18 0.93x and ResNet-50 0.90x
    # the step time on CPU; no effect on towers without 4-D weights); saved checkpoints and models are unchanged
    channels_last: bool = False
    device: str = "auto"  # "auto" | "cpu"
    fsdp: Optional[FsdpConfig] = None  # shard the model over the processes instead of replicating it (GPUs)
    checkpoint_every: int = bounded(500, ge=1)
    keep_last: int = bounded(2, ge=1)
    log_every: int = bounded(10, ge=1)
    # stop after this many consecutive steps with a non-finite loss or gradient
    max_nonfinite_in_row: int = bounded(20, ge=1)
    resume: bool = True  # false (`--no-resume`): start a new run; refused when run_dir already holds one
    resume_from: Optional[str] = None  # a checkpoint folder to resume from instead of run_dir's newest (`--resume-from`)


@dataclass
class ZeroShotConfig:
    data: Optional[str] = None
    classes: Optional[str] = None  # file: one class name per line
    templates: Optional[str] = None  # file: one template per line with "{}" for the class name
    query: Optional[str] = None  # modality to classify, or several "a,b" (N-way); default: the first non-text one
    text: str = "text"
    candidates: Optional[str] = None  # JSONL: the classes each sample chooses among (see mmalign.eval.candidates)


RETRIEVAL_MATCHES = ("item", "label")  # a hit: the query sample's own items, or any with its label


@dataclass
class RetrievalConfig:
    data: Optional[str] = None
    query: Optional[str] = None  # one modality, or several "a,b": N-way retrieval of the gallery from the tuple
    gallery: str = "text"  # one modality, or several "a,b": each query item ranks the samples' tuples
    match: str = "item"  # a hit: the query sample's own items ("item") or any item with the query's label ("label")
    candidates: Optional[str] = None  # JSONL: the samples each query ranks (see mmalign.eval.candidates)
    rerank: Optional[int] = bounded(None, ge=1)  # re-rank each query's top k with the model's matching head (GRAM's DAM)


@dataclass
class DiagnosticsConfig:
    """Embedding-space diagnostics written at the end of every run (gap, alignment, uniformity, PCA plot)."""

    data: Optional[str] = None  # default: eval.retrieval.data, else eval.zeroshot.data, else data.train
    max_samples: int = bounded(500, ge=2)


@dataclass
class GenerationConfig:
    """How captions are decoded (``mmalign.heads.generation.generate``)."""

    strategy: str = "greedy"  # "greedy" | "beam" | "sample"
    num_beams: int = bounded(3, ge=1)
    # most tokens after BOS; default: the text modality's max_length - 1
    max_length: Optional[int] = bounded(None, ge=1)
    min_length: int = bounded(0, ge=0)
    top_k: int = bounded(0, ge=0)
    top_p: float = bounded(1.0, gt=0, le=1)
    temperature: float = bounded(1.0, gt=0)
    repetition_penalty: float = bounded(1.0, gt=0)
    no_repeat_ngram_size: int = bounded(0, ge=0)
    length_penalty: float = bounded(1.0)
    seed: int = bounded(0, ge=0)  # sampling


@dataclass
class CaptionEvalConfig(GenerationConfig):
    data: Optional[str] = None  # shards (references from their text, class words from label.txt) or image files
    out: str = "captions.jsonl"  # relative to the run directory


@dataclass
class EvalConfig:
    batch_size: int = bounded(256, ge=1)
    report_examples: int = bounded(6, ge=0)  # retrieval queries shown in report.html with their top items
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    caption: CaptionEvalConfig = field(default_factory=CaptionEvalConfig)


@dataclass
class Config:
    run_dir: str = MISSING_REQUIRED
    seed: int = bounded(0, ge=0)
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


# What a resumed run may change: nothing here shapes the model or its data, and the checkpoint's optimiser state does
# not hold it. Any other change (towers, sizes, embed_dim, loss, data, seed, optimiser settings) needs a new run.
RESUMABLE = ("run_dir", "train.steps", "train.warmup_steps", "train.grad_accum", "train.gradcache_chunk",
             "train.grad_clip", "train.precision", "train.device", "train.checkpoint_every", "train.keep_last",
             "train.log_every", "train.max_nonfinite_in_row", "train.resume", "train.resume_from", "data.num_workers",
             "data.max_bad_fraction", "eval")
_UNSET = object()


def recipe_changes(saved: dict, new: dict) -> tuple[list[str], list[str]]:
    """What differs between a run's saved recipe and the one resuming it, as ``key: old -> new`` lines: (changes a
    resumed run cannot take, changes it applies). Both are resolved recipes (``to_dict``); keys a newer mmalign
    added read as their defaults."""
    try:
        saved = to_dict(from_dict(Config, saved))
    except ConfigError:  # keys this mmalign no longer has: compare as saved
        pass
    refused, applied = [], []
    for key, old, value in _differences(saved, new, ""):
        resumable = any(key == k or key.startswith(k + ".") for k in RESUMABLE)
        (applied if resumable else refused).append(f"{key}: {_shown(old)} -> {_shown(value)}")
    return refused, applied


def _differences(old: Any, new: Any, where: str) -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(old.keys() | new.keys(), key=str)
                for d in _differences(old.get(key, _UNSET), new.get(key, _UNSET), _join(where, key))]
    return [] if old == new else [(where, old, new)]


def _shown(value: Any) -> str:
    return "(not set)" if value is _UNSET else repr(value)


def validate(cfg: Config, source: str = "config") -> None:
    """Check required keys, ranges (every field's ``bounds``) and enums; raise ``ConfigError`` naming the key."""
    _require(cfg, source)
    if not cfg.model.modalities:
        raise ConfigError(f"{source}: model.modalities is required (e.g. image: {{tower: small_cnn}}, text: {{...}})")
    check_bounds(cfg, lambda key: f"{source}: {key}")
    t, ls = cfg.train, cfg.model.logit_scale
    checks = [
        (cfg.run_dir.strip() != "", "run_dir must not be empty"),
        (t.resume or t.resume_from is None, "train.resume_from (--resume-from) needs train.resume (not --no-resume)"),
        (t.precision in ("no", "fp16", "bf16"), "train.precision must be one of no, fp16, bf16"),
        (t.device in ("auto", "cpu"), "train.device must be 'auto' or 'cpu'"),
        (t.fsdp is None or not t.gradcache_chunk,
         "train.fsdp does not combine with train.gradcache_chunk (GradCache encodes outside the sharded forward)"),
        (ls.init is None or ls.max is None or ls.init <= ls.max,
         "model.logit_scale.init must be in (0, model.logit_scale.max]"),
        (ls.learn in LOGIT_SCALE_LEARN, f"model.logit_scale.learn must be one of {', '.join(LOGIT_SCALE_LEARN)}"),
        (cfg.eval.retrieval.match in RETRIEVAL_MATCHES,
         f"eval.retrieval.match must be {' or '.join(RETRIEVAL_MATCHES)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source}: {message}")
    for name, m in cfg.model.modalities.items():
        if m.proj not in ("linear", "mlp", "none"):
            raise ConfigError(f"{source}: model.modalities.{name}.proj must be linear, mlp or none, got {m.proj!r}")
        if m.output_norm not in OUTPUT_NORMS:
            raise ConfigError(f"{source}: model.modalities.{name}.output_norm must be one of "
                              f"{', '.join(OUTPUT_NORMS)}, got {m.output_norm!r}")
        if m.init not in ("pretrained", "scratch"):
            raise ConfigError(f"{source}: model.modalities.{name}.init must be pretrained or scratch")
        if getattr(m, "long_text", None) == "windows" and cfg.train.gradcache_chunk:
            raise ConfigError(f"{source}: model.modalities.{name}.long_text: windows does not combine with "
                              f"train.gradcache_chunk (GradCache splits batches by rows, windows add rows)")
    cap = cfg.model.caption
    if cap is not None:
        for key in ("context", "text"):
            if getattr(cap, key) not in cfg.model.modalities:
                raise ConfigError(f"{source}: model.caption.{key} {getattr(cap, key)!r} is not one of "
                                  f"model.modalities ({', '.join(cfg.model.modalities)})")
        if cap.context == cap.text:
            raise ConfigError(f"{source}: model.caption.context and model.caption.text must differ")
        if cfg.train.gradcache_chunk:
            raise ConfigError(f"{source}: model.caption does not combine with train.gradcache_chunk (GradCache "
                              f"encodes each modality alone; the caption decoder reads both at once)")
    validate_generation(cfg.eval.caption, lambda key: f"{source}: eval.caption.{key}")
    _check_eval_modalities(cfg, source)


def _check_eval_modalities(cfg: Config, source: str) -> None:
    """The modalities an evaluation the recipe runs names exist and differ (checked before training, not after).
    Either side of a retrieval may be a tuple ``"a,b"``, not both; zero-shot's ``text`` is one modality."""
    zs, rt, names = cfg.eval.zeroshot, cfg.eval.retrieval, list(cfg.model.modalities)
    for run, other_key, other, query in ((zs.data and zs.classes, "text", zs.text, zs.query),
                                         (rt.data, "gallery", rt.gallery, rt.query)):
        if not run:
            continue
        section = "eval.zeroshot" if other_key == "text" else "eval.retrieval"
        queries = [q.strip() for q in query.split(",")] if query else []
        others = [o.strip() for o in other.split(",")] if other_key == "gallery" else [other]
        for key, name in [(other_key, o) for o in others] + [("query", q) for q in queries]:
            if name not in names:
                raise ConfigError(f"{source}: {section}.{key}: the model has no modality {name!r}{closest(name, names)}"
                                  f" (it has {', '.join(names)})")
        if len(set(queries + others)) != len(queries + others):
            raise ConfigError(f"{source}: {section}: query modalities {queries} must be distinct and differ from "
                              f"{other_key} {other!r}")
        if len(queries) > 1 and len(others) > 1:
            raise ConfigError(f"{source}: {section}: query {query!r} and {other_key} {other!r} are both tuples; one "
                              f"side must be a single modality")


def validate_generation(gen: GenerationConfig, name: Callable[[str], str]) -> None:
    """Check generation options; ``name(field)`` says how the error names a field (recipe key or CLI flag)."""
    if gen.strategy not in ("greedy", "beam", "sample"):
        raise ConfigError(f"{name('strategy')} must be greedy, beam or sample")
    check_bounds(gen, name)


def _require(obj: Any, source: str, where: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value == MISSING_REQUIRED:
            raise ConfigError(f"{source}: missing required key {_join(where, f.name)!r}")
        if dataclasses.is_dataclass(value):
            _require(value, source, _join(where, f.name))
