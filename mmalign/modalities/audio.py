"""Audio modality: soundfile decoding, resampling, CLAP-style fixed-length crops, features, augmentation, towers.

CPU side (``AudioModality``, in DataLoader workers): bytes -> ``soundfile`` -> mono (or one channel) -> resampled
to the tower's rate with torchaudio -> a fixed-length window (random crop when training; a deterministic crop or
several evenly spaced windows when evaluating, so a file always embeds the same) -> features -> SpecAugment (training
only). Short clips are zero-padded and carry the fraction of each window that holds signal (``valid``), from which
the towers build their time masks.

An item is ``{"input": W x <features>, "valid": W}`` with W windows (1 when training). A batch stacks the windows
as rows, ``{"input": N x <features>, "valid": N}``, plus ``owner`` when an item has several: the adapter then
averages the tower features of an item's windows (the "fusion of several windows" evaluation of long clips).

Features (each tower's spec names them, ``AudioTowerSpec.features``): ``OwnFeatures``, ``logmel`` (torchaudio
``MelSpectrogram``, log) or ``fbank`` (Kaldi filterbanks, ``torchaudio.compliance.kaldi``) for the towers trained from
scratch; ``HFFeatures``, the model's own feature extractor (AST, Whisper, CLAP, wav2vec2/HuBERT/WavLM) loaded from the
same hub name or folder as the model, whose sampling rate and fixed input length are the modality's defaults.

Towers: ``mel_cnn`` (from scratch), ``hf`` (any of the HF encoders above; from a ``ClapModel`` checkpoint its audio
half with the audio projection) and ``hf_clip`` (the audio part of an HF dual encoder such as ``ClapModel``, kept in
the checkpoint's layout so a CLAP pair exports as one ``ClapModel``).
"""
from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from ..modality_config import AudioAugmentConfig, AudioConfig
from ..optional import require
from .hf import HFDualEncoderTower, HFExport, dual_tower_spec, load_hf_config, resolve_pretrained
from .layers import norm_layer, sinusoidal_positions
from .registry import OWNER, Modality, TowerSpec, named_errors, register_modality, register_tower

log = logging.getLogger(__name__)

AUDIO_RATES = (1_000, 768_000)  # sample rates (Hz) a file may declare
MAX_RESAMPLE_PHASES = 4_000_000  # largest resampling filter (output x input phases) built for a file's rate

EVAL_CROPS = ("start", "center", "windows")
OWN_FEATURES = ("logmel", "fbank")
AUDIO_POOLING = {"ast": "pooler_output", "clap": "audio_embeds"}  # HF family -> exported output; others: "mean"


@dataclass(frozen=True, kw_only=True)
class AudioTowerSpec(TowerSpec):
    """An audio tower's spec adds its features: resolved config -> an object turning a window of samples into the
    tower's input (``__call__(window, signal) -> (features, valid fraction)``, ``fixed_samples()``, ``axes`` for
    SpecAugment or None, ``save(directory) -> bool``): ``OwnFeatures`` or ``HFFeatures.from_config``."""

    features: Callable[[AudioConfig], Any]


# --------------------------------------------------------------------------------------------- pure functions


def read_audio(data: bytes, ext: str, channel: int | None = None) -> tuple[torch.Tensor, int]:
    """Decode with soundfile -> (samples,) float32 mono (mean of channels) or one channel, and the sample rate."""
    import soundfile as sf

    try:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as e:
        raise DataError(f"cannot decode audio ({ext}): {str(e).strip() or type(e).__name__}") from None
    if wave.shape[0] == 0:
        raise DataError(f"audio ({ext}) is empty (0 samples)")
    if channel is not None:
        if channel >= wave.shape[1]:
            raise DataError(f"audio ({ext}) has {wave.shape[1]} channel(s); channel={channel} was asked for")
        wave = wave[:, channel]
    else:
        wave = wave.mean(axis=1)
    if not np.isfinite(wave).all():
        raise DataError(f"audio ({ext}) has non-finite samples")
    return torch.from_numpy(np.ascontiguousarray(wave)), int(rate)


def crop_starts(length: int, n: int, mode: str, windows: int = 1) -> list[int]:
    """Deterministic window starts for evaluation: the first, the central, or ``windows`` evenly spaced ones."""
    room = max(0, length - n)
    if mode == "start":
        return [0]
    if mode == "center":
        return [room // 2]
    return [round(room * i / (windows - 1)) if windows > 1 else room // 2 for i in range(windows)]


def fit_window(wave: torch.Tensor, start: int, n: int) -> tuple[torch.Tensor, int]:
    """``wave[start:start+n]`` zero-padded to ``n``; also returns how many samples are signal."""
    chunk = wave[start:start + n]
    return F.pad(chunk, (0, n - chunk.shape[0])), chunk.shape[0]


def add_noise(wave: torch.Tensor, snr_db: float) -> torch.Tensor:
    """White Gaussian noise scaled so that 10 log10(P_signal / P_noise) = ``snr_db``."""
    power = wave.pow(2).mean().clamp(min=1e-12)
    return wave + torch.randn_like(wave) * torch.sqrt(power / 10 ** (snr_db / 10))


def time_shift(wave: torch.Tensor, samples: int) -> torch.Tensor:
    """Shift right by prepending ``samples`` zeros, or left by dropping ``-samples`` (keeping at least one)."""
    if samples >= 0:
        return F.pad(wave, (samples, 0))
    return wave[min(-samples, wave.shape[0] - 1):]


def spec_augment(spec: torch.Tensor, freq_axis: int, time_axis: int, cfg: AudioAugmentConfig) -> torch.Tensor:
    """SpecAugment frequency and time masking (Park et al. 2019), masked with the spectrogram's mean."""
    import torchaudio.functional as AF

    value = spec.mean().item()
    for axis, count, width in ((freq_axis, cfg.freq_masks, cfg.freq_mask_width),
                               (time_axis, cfg.time_masks, cfg.time_mask_width)):
        for _ in range(count):
            spec = AF.mask_along_axis(spec, width, value, axis % spec.dim())
    return spec


def uniform(bounds: tuple) -> float:
    lo, hi = (float(b) for b in bounds)
    return lo + (hi - lo) * torch.rand(()).item()


def frame_mask(valid: torch.Tensor, frames: int) -> torch.Tensor:
    """N x frames mask: the first ceil(valid * frames) frames (at least one) of each row hold signal."""
    count = torch.ceil(valid * frames).clamp(min=1, max=frames)
    return torch.arange(frames, device=valid.device)[None, :] < count[:, None]


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over time (dim 1) of ``hidden`` (N x T x D) where ``mask`` (N x T) is true."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


# --------------------------------------------------------------------------------------------- features

HF_SPECTROGRAM_AXES = {  # family -> (freq axis, time axis) of one window's features
    "ast": (-1, -2),  # frames x mel bins
    "whisper": (-2, -1),  # mel bins x frames
    "clap": (-1, -2),  # channels x frames x mel bins
}


def hf_family(model_type: str) -> str:
    """HF ``model_type`` -> how its inputs are built: ast, whisper, clap, or waveform (wav2vec2, HuBERT, ...)."""
    if model_type == "audio-spectrogram-transformer":
        return "ast"
    if model_type in ("clap", "clap_audio_model"):
        return "clap"
    return "whisper" if model_type == "whisper" else "waveform"


class OwnFeatures:
    """Log-mel (``MelSpectrogram`` then log) or Kaldi fbank features, mel bins x frames."""

    axes = (-2, -1)

    def __init__(self, cfg: AudioConfig):
        if cfg.features not in OWN_FEATURES:
            raise ConfigError(f"features must be logmel or fbank, got {cfg.features!r}")
        self.cfg, self.rate = cfg, cfg.sample_rate
        self._mel = None

    def fixed_samples(self) -> int | None:
        return None

    def save(self, directory: Path) -> bool:
        return False

    def __call__(self, window: torch.Tensor, signal: int) -> tuple[torch.Tensor, float]:
        cfg = self.cfg
        if cfg.features == "fbank":
            from torchaudio.compliance import kaldi

            ms = 1000 / self.rate
            feats = kaldi.fbank(window[None] * 32768, num_mel_bins=cfg.n_mels, sample_frequency=self.rate,
                                frame_length=cfg.n_fft * ms, frame_shift=cfg.hop_length * ms, low_freq=cfg.f_min,
                                high_freq=cfg.f_max or 0.0, dither=0.0, window_type="hanning").T
        else:
            if self._mel is None:
                import torchaudio

                self._mel = torchaudio.transforms.MelSpectrogram(
                    self.rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, f_min=cfg.f_min, f_max=cfg.f_max,
                    n_mels=cfg.n_mels)
            feats = torch.log(self._mel(window) + 1e-6)
        return feats, signal / window.shape[0]


class HFFeatures:
    """A HF feature extractor (``AutoFeatureExtractor``) applied to the signal part of a window.

    Spectrogram models (AST, Whisper, CLAP) get the unpadded signal and pad it their own way to their fixed input;
    waveform models (wav2vec2, HuBERT, WavLM) get it padded to the window length, normalised over the signal only.
    """

    def __init__(self, extractor, family: str):
        self.extractor, self.family = extractor, family
        self.axes = HF_SPECTROGRAM_AXES.get(family)

    @classmethod
    def from_config(cls, cfg: AudioConfig) -> "HFFeatures":
        """The extractor of ``cfg.model``; the config must leave features to it."""
        if cfg.features != "auto":
            raise ConfigError(f"{cfg.tower} towers use the model's feature extractor; leave 'features' unset")
        extractor = load_feature_extractor(cfg.model, cfg.trust_remote_code)
        return cls(extractor, hf_family(load_hf_config(cfg.model, cfg.trust_remote_code).model_type))

    def defaults(self) -> dict[str, Any]:
        """The extractor's rate, and its fixed input (spectrogram models) as the clip length."""
        rate, fixed = int(self.extractor.sampling_rate), self.fixed_samples()
        return {"sample_rate": rate, **({"clip_seconds": fixed / rate} if fixed else {})}

    def save(self, directory: Path) -> bool:
        directory.mkdir(parents=True, exist_ok=True)
        self.extractor.save_pretrained(directory)
        return True

    def fixed_samples(self) -> int | None:
        fe = self.extractor
        if self.family == "ast":  # Kaldi frames of 25 ms every 10 ms, padded or cut to max_length frames
            return int((fe.max_length - 1) * 0.010 * fe.sampling_rate + 0.025 * fe.sampling_rate)
        if self.family == "whisper":
            return int(fe.n_samples)
        if self.family == "clap":
            return int(fe.nb_max_samples)
        return None

    def __call__(self, window: torch.Tensor, signal: int) -> tuple[torch.Tensor, float]:
        fe, chunk = self.extractor, window[:signal].numpy()
        if self.family == "waveform":
            out = fe(chunk, sampling_rate=fe.sampling_rate, padding="max_length", max_length=window.shape[0],
                     truncation=True, return_attention_mask=True, return_tensors="pt")
            return out["input_values"][0], signal / window.shape[0]
        out = fe(chunk, sampling_rate=fe.sampling_rate, return_tensors="pt")
        key = "input_values" if "input_values" in out else "input_features"
        return out[key][0], min(1.0, signal / self.fixed_samples())


def load_feature_extractor(name: str, trust_remote_code: bool):
    from transformers import AutoFeatureExtractor

    try:
        return AutoFeatureExtractor.from_pretrained(resolve_pretrained(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the feature extractor of {name!r}: {str(e).splitlines()[0]}") from None


# --------------------------------------------------------------------------------------------- the modality


@register_modality
class AudioModality(Modality):
    kind = "audio"
    extensions = ("flac", "wav", "mp3", "ogg", "opus")
    config_class = AudioConfig
    spec_class = AudioTowerSpec
    default_tower = "mel_cnn"
    defaults = {"sample_rate": 16000, "clip_seconds": 10.0}

    def __init__(self, name: str, cfg: AudioConfig):
        super().__init__(name, cfg)
        for module in ("soundfile", "torchaudio"):
            require(module, "audio", f"audio modality {name!r}")
        if cfg.eval_crop not in EVAL_CROPS:
            raise ConfigError(f"modality {name!r}: eval_crop must be one of {', '.join(EVAL_CROPS)}")
        with named_errors(name):
            self.features = self.spec.features(cfg)
        self.rate = cfg.sample_rate
        fixed = self.features.fixed_samples()
        self.clip_samples = int(round(cfg.clip_seconds * self.rate))
        if fixed and self.clip_samples > fixed:
            raise ConfigError(f"modality {name!r}: clip_seconds={cfg.clip_seconds} is longer than the "
                              f"{fixed / self.rate:.2f} s the feature extractor of {cfg.model!r} takes")
        aug = cfg.augment
        for key in ("gain_db", "noise_snr_db"):
            bounds = getattr(aug, key)
            if bounds is not None and bounds[0] > bounds[1]:
                raise ConfigError(f"modality {name!r}: augment.{key} must be [low, high] with low <= high")
        if self.features.axes is None and (aug.freq_masks or aug.time_masks):
            raise ConfigError(f"modality {name!r}: SpecAugment needs spectrogram features; {cfg.model!r} takes "
                              "waveforms (use the model's own mask_time_prob via tower_kwargs)")
        self._resamplers: dict[int, Any] = {}

    def __getstate__(self):
        return {**self.__dict__, "_resamplers": {}}

    def decode(self, data: bytes, ext: str) -> torch.Tensor:
        """Bytes -> (samples,) float32 at the tower's rate; empty, silent or unreadable audio -> ``DataError``."""
        wave, rate = read_audio(data, ext, self.cfg.channel)
        peak = wave.abs().max().item()
        if peak < self.cfg.silence_threshold:
            raise DataError(f"audio ({ext}) is silent (peak amplitude {peak:.2g} < silence_threshold)")
        if rate != self.rate:
            wave = self.resampler(rate, ext)(wave)
        return wave

    def resampler(self, rate: int, ext: str) -> nn.Module:
        """torchaudio's resampler from ``rate`` Hz (a few cached); a rate it cannot handle at a sane cost -> DataError.

        Its filter has (target / g) x (rate / g) phases for g = gcd(rate, target): small for real-world rates, but
        gigabytes for a co-prime one such as a corrupt header's 44101 Hz.
        """
        if rate not in self._resamplers:
            g = math.gcd(rate, self.rate)
            if not AUDIO_RATES[0] <= rate <= AUDIO_RATES[1] or (rate // g) * (self.rate // g) > MAX_RESAMPLE_PHASES:
                raise DataError(f"audio ({ext}) at {rate} Hz cannot be resampled to {self.rate} Hz at a sane cost; "
                                "convert it to a common rate (8000, 16000, 22050, 44100, 48000 Hz, ...)")
            import torchaudio

            if len(self._resamplers) >= 8:
                self._resamplers.pop(next(iter(self._resamplers)))
            self._resamplers[rate] = torchaudio.transforms.Resample(rate, self.rate)
        return self._resamplers[rate]

    def transform(self, wave: torch.Tensor, train: bool) -> dict[str, torch.Tensor]:
        n = self.clip_samples
        if train:
            wave = self.augment_wave(wave)
            starts = [int(torch.randint(0, max(1, wave.shape[0] - n + 1), ()).item())]
        else:
            starts = crop_starts(wave.shape[0], n, self.cfg.eval_crop, self.cfg.eval_windows)
        feats, valid = [], []
        for start in starts:
            f, v = self.features(*fit_window(wave, start, n))
            feats.append(f)
            valid.append(v)
        x = torch.stack(feats)
        if train and self.features.axes is not None:
            x = spec_augment(x, *self.features.axes, self.cfg.augment)
        return {"input": x, "valid": torch.tensor(valid, dtype=torch.float32)}

    def placeholder(self, train: bool) -> dict[str, torch.Tensor]:
        """One window of silence through the tower's features (no augmentation, no randomness)."""
        features, valid = self.features(torch.zeros(self.clip_samples), self.clip_samples)
        return {"input": features[None], "valid": torch.tensor([valid], dtype=torch.float32)}

    def augment_wave(self, wave: torch.Tensor) -> torch.Tensor:
        aug = self.cfg.augment
        if aug.shift_s > 0:
            limit = int(aug.shift_s * self.rate)
            wave = time_shift(wave, int(torch.randint(-limit, limit + 1, ()).item()))
        gain = uniform(aug.gain_db)
        if gain:
            wave = wave * 10 ** (gain / 20)
        if aug.noise_snr_db is not None and torch.rand(()).item() < aug.noise_p:
            wave = add_noise(wave, uniform(aug.noise_snr_db))
        return wave

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """Windows as rows; ``owner`` (row -> item) when an item has several, for the adapter to average."""
        batch = {k: torch.cat([item[k] for item in items]) for k in ("input", "valid")}
        counts = torch.tensor([item["valid"].shape[0] for item in items])
        if (counts > 1).any():
            batch[OWNER] = torch.repeat_interleave(torch.arange(len(items)), counts)
        return batch

    def save_assets(self, tower: nn.Module, directory: Path) -> dict:
        """HF towers: the model config (the tower's ``save_config``) and the feature extractor."""
        updates = super().save_assets(tower, directory)
        if updates:
            self.features.save(directory)
        return updates

    def save_hf_preprocessor(self, directory: Path) -> dict:
        self.features.save(directory)
        cfg = self.cfg
        return {"sample_rate": self.rate, "clip_seconds": cfg.clip_seconds, "eval_crop": cfg.eval_crop,
                "eval_windows": cfg.eval_windows}


# --------------------------------------------------------------------------------------------- towers


class MelCNN(nn.Module):
    """1-D convolutions over time with mel bins as channels (fast on CPU), optional transformer layers on top;
    masked mean + max pooling over the frames that hold signal. The stem strides by ``stem_stride`` and each
    residual block halves the time resolution. ``norm``: ``batch`` or ``group`` (rows normalised alone: the same
    result on any number of processes, and with GradCache)."""

    def __init__(self, n_mels: int, width: int = 128, depth: int = 4, kernel: int = 5, stem_stride: int = 2,
                 transformer_layers: int = 0, heads: int = 4, dropout: float = 0.1, norm: str = "batch"):
        super().__init__()
        self.input_norm = norm_layer(norm, n_mels, dims=1)
        self.stem = nn.Sequential(
            nn.Conv1d(n_mels, width, kernel, stride=stem_stride, padding=kernel // 2, bias=False),
            norm_layer(norm, width, dims=1), nn.GELU())
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Conv1d(width, width, kernel, padding=kernel // 2, bias=False), norm_layer(norm, width, dims=1),
            nn.GELU(),
            nn.Conv1d(width, width, kernel, padding=kernel // 2, bias=False), norm_layer(norm, width, dims=1),
        ) for _ in range(depth))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.transformer = (nn.TransformerEncoder(layer, transformer_layers, enable_nested_tensor=False)
                            if transformer_layers else None)
        self.out_dim, self.token_dim = 2 * width, width

    def forward_tokens(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame features N x T' x width and the mask of frames that hold signal (a CoCa decoder's context)."""
        h = self.stem(self.input_norm(inputs["input"]))
        for block in self.blocks:
            h = F.avg_pool1d(F.gelu(h + block(h)), 2, ceil_mode=True)
        h = h.transpose(1, 2)  # N x T x C
        mask = frame_mask(inputs["valid"], h.shape[1])
        if self.transformer is not None:
            h = self.transformer(h + sinusoidal_positions(h.shape[1], h.shape[2], h.device), src_key_padding_mask=~mask)
        return h, mask

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        h, mask = self.forward_tokens(inputs)
        peak = h.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
        return torch.cat([masked_mean(h, mask), peak], dim=-1)


register_tower("audio", "mel_cnn", AudioTowerSpec(build=lambda cfg: MelCNN(cfg.n_mels, **cfg.tower_kwargs),
                                                   defaults=lambda cfg: {"features": "logmel"}, features=OwnFeatures,
                                                   tower_kwargs=MelCNN))


class HFAudioTower(nn.Module):
    """A HF audio encoder: AST (pooler output), Whisper encoder (masked mean), CLAP audio tower with its projection
    (``audio_embeds``), or any waveform encoder such as wav2vec2/HuBERT/WavLM (masked mean of the last layer)."""

    def __init__(self, name: str, from_scratch: bool, trust_remote_code: bool, **kwargs):
        super().__init__()
        import transformers

        config = load_hf_config(name, trust_remote_code, **kwargs)
        self.family = hf_family(config.model_type)
        path = resolve_pretrained(name)
        if self.family == "clap":
            cls = transformers.ClapAudioModelWithProjection
            config = getattr(config, "audio_config", config)  # a full ClapModel checkpoint: its audio half
        elif self.family == "whisper":
            from transformers.models.whisper.modeling_whisper import WhisperEncoder

            cls = WhisperEncoder if from_scratch else transformers.WhisperModel  # the encoder half only
        else:
            cls = transformers.AutoModel
        try:
            if not from_scratch:
                model = cls.from_pretrained(path, config=config, trust_remote_code=trust_remote_code)
            elif cls is transformers.AutoModel:
                model = cls.from_config(config, trust_remote_code=trust_remote_code)
            else:
                model = cls(config)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load HF audio model {name!r}: {str(e).splitlines()[0]}") from None
        self.model = model.get_encoder() if isinstance(model, transformers.WhisperModel) else model
        cfg = model.config
        width = getattr(cfg, "d_model", None) or getattr(cfg, "hidden_size", None)
        self.out_dim = cfg.projection_dim if self.family == "clap" else width
        self.token_dim = None if self.family == "clap" else width  # CLAP's Swin gives no plain token sequence
        # wav2vec2-style models with group-normalised conv features are trained on zero padding without a mask
        self.pass_mask = getattr(cfg, "feat_extract_norm", "layer") == "layer"

    def forward_tokens(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The last hidden states and the mask of frames that hold signal (AST: every patch; not for CLAP)."""
        x, valid = inputs["input"], inputs["valid"]
        if self.family == "ast":
            return self.model(input_values=x).last_hidden_state, None
        if self.family == "whisper":
            hidden = self.model(input_features=x).last_hidden_state
        else:
            attention = frame_mask(valid, x.shape[-1]).long() if self.pass_mask else None
            hidden = self.model(input_values=x, attention_mask=attention).last_hidden_state
        return hidden, frame_mask(valid, hidden.shape[1])

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.family == "ast":
            return self.model(input_values=inputs["input"]).pooler_output
        if self.family == "clap":
            x = inputs["input"]
            return self.model(input_features=x, is_longer=clap_is_longer(self.model.config, x)).audio_embeds
        return masked_mean(*self.forward_tokens(inputs))

    def save_config(self, directory: Path) -> None:
        self.model.config.save_pretrained(directory)

    def hf_export(self) -> HFExport:
        return HFExport(self.model, AUDIO_POOLING.get(self.family, "mean"))


def hf_audio_defaults(cfg: AudioConfig) -> dict[str, Any]:
    """The feature extractor's rate and fixed input length. A recipe's other ``sample_rate`` cannot be honoured (the
    model was trained at its rate): it is replaced, with a warning, and audio is resampled to the model's rate."""
    defaults = HFFeatures.from_config(cfg).defaults()
    if cfg.sample_rate not in (None, defaults["sample_rate"]):
        log.warning("sample_rate=%s, but %r was trained on %d Hz audio: audio is resampled to %d Hz",
                    cfg.sample_rate, cfg.model, defaults["sample_rate"], defaults["sample_rate"])
        cfg.sample_rate = defaults["sample_rate"]
    return defaults


register_tower("audio", "hf", AudioTowerSpec(
    build=lambda cfg: HFAudioTower(cfg.model, cfg.init == "scratch", cfg.trust_remote_code, **cfg.tower_kwargs),
    defaults=hf_audio_defaults, features=HFFeatures.from_config, model="a hub name or folder",
    export={"hf": HFAudioTower.hf_export}))


def clap_is_longer(audio_config, x: torch.Tensor) -> torch.Tensor:
    """CLAP's ``is_longer`` flags: the feature extractor marks a single clip "longer" exactly in fusion mode (and
    clips never exceed its fixed length here, so no clip is longer otherwise)."""
    return torch.full((x.shape[0], 1), bool(audio_config.enable_fusion), dtype=torch.bool, device=x.device)


class ClapDualAudioTower(HFDualEncoderTower):
    """``hf_clip`` for audio: ``ClapModel.get_audio_features`` on this modality's features."""

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["input"]
        return super().forward({"input_features": x, "is_longer": clap_is_longer(self.sub_config, x)})


register_tower("audio", "hf_clip", dual_tower_spec("audio", AudioTowerSpec, ClapDualAudioTower,
                                                   defaults=hf_audio_defaults, features=HFFeatures.from_config))
