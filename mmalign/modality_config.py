"""The modality sections of a recipe: what every section has (``ModalityConfig``) and each built-in kind's own fields.

Plain dataclasses, no torch: ``mmalign.config`` reads recipes with them (``MODALITY_CONFIGS``: kind -> class) without
importing the modalities, which sit above it. A kind defined elsewhere registers its class with
``register_modality_config`` (``modalities.register_modality`` does it for every kind it registers).

A field left unset (None; ``"auto"`` where a field says so) is filled once, before anything is built, from the
tower's preprocessing (its checkpoint's, where it has one) and then the kind's defaults (``modalities.Modality``),
so a resolved config is complete and a saved model records exactly how it preprocesses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from .bounds import bounded


@dataclass
class LoraConfig:
    """LoRA (Hu et al. 2021) on a tower via ``peft``: W x + (alpha / r) B A x, with the tower's own weights frozen."""

    r: int = bounded(8, ge=1)
    alpha: float = bounded(16.0, gt=0)
    dropout: float = bounded(0.0, ge=0, lt=1)
    # module names (suffixes, as peft matches them) or one regex; default: every linear layer and multi-head
    # attention inside the tower's block stack (attention and MLP)
    target_modules: Optional[Union[list, str]] = None


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
    proj_hidden: Optional[int] = bounded(None, ge=1)
    lock: bool = False  # LiT: freeze the tower
    unlocked_layers: int = bounded(0, ge=0)  # with lock: keep the last N blocks trainable
    unlock_norms: bool = False  # with lock: keep normalisation layers trainable
    cache_frozen: bool = False  # cache a fully locked tower's features per distinct input (e.g. repeated captions)
    lora: Optional[LoraConfig] = None  # parameter-efficient fine-tuning: train LoRA adapters instead of the tower
    trust_remote_code: bool = False
    optional: bool = False  # samples may lack it: batches carry "<name>__present", the model a learned missing embedding

    @property
    def fully_locked(self) -> bool:
        """Every weight of the tower frozen: ``lock`` with no unlocked layers, norms or LoRA."""
        return self.lock and self.lora is None and self.unlocked_layers == 0 and not self.unlock_norms

    @property
    def caches_features(self) -> bool:
        """The tower's features are cached per distinct input (``cache_frozen`` on a fully locked tower)."""
        return self.cache_frozen and self.fully_locked


@dataclass
class ImageConfig(ModalityConfig):
    # Preprocessing left unset comes from the checkpoint (HF image processor, open_clip preprocess config),
    # else 224 px with CLIP's mean/std, shortest-side resize + centre crop, bicubic.
    image_size: Optional[int] = bounded(None, ge=1)
    mean: Optional[tuple] = bounded(None)
    std: Optional[tuple] = bounded(None, gt=0)
    resize_mode: Optional[str] = None  # open_clip: "shortest" | "longest" | "squash"
    interpolation: Optional[str] = None  # "bicubic" | "bilinear" | "nearest"
    augment: dict = field(default_factory=dict)  # open_clip AugmentationCfg keys, e.g. {scale: [0.8, 1.0]}


@dataclass
class TextConfig(ModalityConfig):
    # tokens per caption; default: the tower's limit (hf_clip, open_clip) or 77
    max_length: Optional[int] = bounded(None, ge=2)
    padding: Optional[str] = None  # "longest" (in the batch) | "max_length" (SigLIP pools the last position)
    long_text: str = "truncate"  # "truncate" | "windows": HF towers encode overlapping windows and average them
    window_overlap: int = bounded(16, ge=0)  # tokens shared by consecutive windows (long_text: windows)
    pooling: str = "mean"  # "mean" | "cls" (HF towers)
    tokenizer: Optional[str] = None  # defaults to the tower's own (coca_decoder: open_clip's CLIP BPE)


@dataclass
class AudioAugmentConfig:
    """Training-time augmentation (off in evaluation). Ranges are drawn uniformly per sample."""

    gain_db: tuple = bounded((0.0, 0.0), length=2)  # e.g. [-6, 6]
    noise_snr_db: Optional[tuple] = bounded(None, length=2)  # e.g. [10, 40]: white noise at this signal-to-noise ratio
    noise_p: float = bounded(0.5, ge=0, le=1)  # probability of adding noise when noise_snr_db is set
    # time shift up to this many seconds either way (drops samples or prepends silence)
    shift_s: float = bounded(0.0, ge=0)
    freq_masks: int = bounded(0, ge=0)  # SpecAugment (Park et al. 2019): number of frequency masks ...
    freq_mask_width: int = bounded(8, ge=1)  # ... each up to this many bins wide
    time_masks: int = bounded(0, ge=0)  # number of time masks ...
    time_mask_width: int = bounded(10, ge=1)  # ... each up to this many frames wide


@dataclass
class AudioConfig(ModalityConfig):
    sample_rate: Optional[int] = bounded(None, ge=1)  # tower's rate; default: the HF feature extractor's, else 16 kHz
    channel: Optional[int] = bounded(None, ge=0)  # None: mix down to mono; an index: use that channel only
    clip_seconds: Optional[float] = bounded(None, gt=0)  # fixed window; default: the HF extractor's input, else 10 s
    eval_crop: str = "center"  # "start" | "center" | "windows" (mean of eval_windows evenly spaced windows)
    eval_windows: int = bounded(3, ge=1)
    # peak amplitude below which a clip is rejected as silent (0: keep all)
    silence_threshold: float = bounded(1e-4, ge=0)
    features: str = "auto"  # "logmel" | "fbank" for own towers; "auto": logmel, or the HF tower's extractor
    n_mels: int = bounded(64, ge=1)
    n_fft: int = bounded(400, ge=2)  # window length in samples (25 ms at 16 kHz)
    hop_length: int = bounded(160, ge=1)  # 10 ms at 16 kHz
    f_min: float = bounded(0.0, ge=0)
    f_max: Optional[float] = bounded(None, gt=0)
    augment: AudioAugmentConfig = field(default_factory=AudioAugmentConfig)


@dataclass
class TimeseriesAugment:
    """Training-only augmentations, in standardised units (all off by default)."""

    scale: Optional[tuple] = bounded(None, gt=0, length=2)  # (low, high): per-lead amplitude factor drawn uniformly
    baseline_wander: float = bounded(0.0, ge=0)  # largest amplitude of a 0.05-0.5 Hz sinusoid added per lead
    noise: float = bounded(0.0, ge=0)  # standard deviation of added Gaussian noise
    lead_dropout: float = bounded(0.0, ge=0, lt=1)  # probability to zero (and mask) each present lead; one always stays
    time_mask: float = bounded(0.0, ge=0, lt=1)  # largest fraction of the window zeroed as one span across leads


@dataclass
class TimeseriesConfig(ModalityConfig):
    sample_rate: float = bounded(100.0, gt=0)  # Hz the tower sees; records are resampled to it
    window_s: float = bounded(10.0, gt=0)  # window length in seconds: random crop in training, centred in evaluation
    leads: Optional[tuple] = None  # channel names in the tower's order; records are reordered by name (any case)
    channels: int = bounded(0, ge=0)  # channel count when `leads` is not given (records are then used in stored order)
    missing_leads: str = "mask"  # "mask": zero-fill and mask a requested lead a record lacks; "error": skip it
    standardize: bool = True  # per lead: zero mean, unit variance over the window
    bandpass: Optional[tuple] = None  # (low, high) Hz, either may be null (high-/low-pass): zero-phase Butterworth
    augment: TimeseriesAugment = field(default_factory=TimeseriesAugment)


# kind -> its section's dataclass: the built-in kinds, and those registered by ``register_modality_config``
MODALITY_CONFIGS: dict[str, type[ModalityConfig]] = {
    "image": ImageConfig, "text": TextConfig, "audio": AudioConfig, "timeseries": TimeseriesConfig,
}


def register_modality_config(kind: str, cls: type[ModalityConfig]) -> None:
    MODALITY_CONFIGS[kind] = cls
