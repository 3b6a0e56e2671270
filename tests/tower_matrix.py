"""The tower matrix: every registered tower, built from a tiny config of its real architecture saved to a local folder,
trained the way users train it, on one process and on two (``torchrun``, gloo), then resumed, reloaded and exported.
Used by ``test_tower_matrix.py`` and its ``torchrun`` script ``scripts/dist_tower_matrix.py``.

Every case trains two towers (each one a tower under test) for ``STEPS`` steps with a checkpoint halfway. No full
cross product: each case puts different options on its towers, so that every code path a tower goes through is
taken at least once, and every tower trains (is not locked) in at least one case where two processes must match one:

==================  =============================================================  ==========================
case                towers and how they train                                      loss, training, export
==================  =============================================================  ==========================
open_clip_vit       open_clip ViT image at image_size 48 (built for 32: open_clip's    clip; open_clip export
                    force_image_size), open_clip text, both trainable (issue 16:
                    the text tower's unused logit_scale stopped DDP at step 2)
open_clip_convnext  open_clip ConvNeXt image (timm trunk), open_clip text with LoRA    chunked_clip; open_clip
                    (peft on nn.MultiheadAttention and the MLPs)                       export (LoRA merged)
open_clip_resnet    open_clip ModifiedResNet image (BatchNorm), BERT locked (LiT)      clip; 2 processes run
                                                                                       (BatchNorm: see below)
timm_vit            timm ViT at image_size 32 (built for 160: timm's img_size),        clip, bf16
                    locked with norms unlocked; HF CLIPModel text side trainable
timm_convnext       timm ConvNeXt trainable; BERT trainable                            GradCache (chunks of 2)
clip                HF CLIPModel image side locked with its last block unlocked,       clip; hf export as one
                    text side trainable                                                CLIPModel
siglip              HF SiglipModel image and text sides trainable                      siglip; hf export as one
                                                                                       SiglipModel
clap                HF ClapModel audio and text sides trainable                        clip; 2 processes run
                                                                                       (BatchNorm); hf export as
                                                                                       one ClapModel
ast                 AST with LoRA; BERT trainable                                      clip; hf export (towers)
whisper             Whisper encoder trainable; BERT locked                             clip, bf16; hf export
wav2vec2            wav2vec2 trainable; BERT locked with its last layer unlocked       chunked_clip; hf export
hubert              HuBERT (group-normalised conv features) trainable; BERT            GradCache; hf export
clap_audio          CLAP audio tower with its projection (``tower: hf``), locked;      clip; hf export (towers)
                    ClapModel text side trainable
mel_cnn             mel_cnn (norm: group) trainable; BERT trainable                    GradCache
resnet1d            ECG resnet1d (BatchNorm) trainable; BERT trainable                 clip; 2 processes run
patch_transformer   ECG patch_transformer trainable; BERT trainable                    chunked_clip, bf16
flatten             ECG flatten (no weights: its projection trains) with a LayerNorm   clip, learned temperature
                    output (output_norm: layernorm); BERT trainable                    (uncapped)
coca_decoder        small_cnn (norm: group) + mmalign's CoCa caption decoder           coca, channels-last
open_clip_coca      open_clip CoCa ViT + open_clip_coca text, the tower's own tokens   coca (n_queries 0)
                    as context
==================  =============================================================  ==========================

For every case: the loss on 1 process and the loss and final weights on 2 processes (half the batch each, one shard
each) are equal, with DDP's defaults (no ``find_unused_parameters``); a run resumed from the halfway checkpoint ends
with the weights of the uninterrupted run; the saved model folder and the checkpoint give the same embeddings, and
so does the exported folder loaded with plain transformers / open_clip where a format applies. BatchNorm towers
(``open_clip_resnet``, ``resnet1d``, CLAP's audio encoder, which normalises its mel bins with BatchNorm) normalise each process's rows with that process's batch statistics, as DDP
without SyncBatchNorm does, so their 2-process runs are checked to train (every step finite, no DDP failure), not
to equal one process; their GroupNorm variants (``small_cnn``, ``mel_cnn``, ``resnet1d`` with ``norm: group``) and
every LayerNorm tower are compared exactly. Dropout is off in every tiny config (a dropout mask depends on the
process's random stream). bf16 runs (autocast on CPU) are compared at bf16's precision.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conftest import SHAPES, COLOURS, TINY_TOWER, save_clip_tokenizer, shape_png, write_shard

STEPS = 4  # checkpoints at steps 2 and 4: a run resumed from step 2 must end with the weights of step 4
BATCH = 8  # one process: 8 rows from both shards; two processes: 4 rows each, one shard each
EMBED_DIM = 16
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
WAVE_NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                       final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0)
OPEN_CLIP_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
OPEN_CLIP = {  # tiny open_clip architectures, saved as local-dir: folders with weights
    "oc_vit": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                               "head_width": 16}, "text_cfg": OPEN_CLIP_TEXT},
    "oc_convnext": {"embed_dim": 16, "vision_cfg": {"timm_model_name": "test_convnext", "timm_model_pretrained": False,
                                                    "timm_pool": "", "timm_proj": "linear", "timm_drop": 0.0,
                                                    "timm_drop_path": 0.0, "image_size": 32},
                    "text_cfg": OPEN_CLIP_TEXT},
    "oc_resnet": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8,
                                                  "patch_size": None}, "text_cfg": OPEN_CLIP_TEXT},
}
OPEN_CLIP_COCA = {  # tower_kwargs of coca_ViT-B-32 from scratch
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16,
                   "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 4, "output_tokens": True},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "embed_cls": True,
                 "output_tokens": True},
    "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                       "attn_pooler_heads": 2},
}


# ------------------------------------------------------------------------------------------------- checkpoints


def save_hf_assets(root: Path) -> None:
    """Tiny randomly initialised HF checkpoints of every architecture the matrix trains, each with its tokenizer,
    image processor or feature extractor, as ``root/<name>`` folders."""
    import torch
    import transformers as tr

    from mmalign.modalities.hf import resolve_pretrained

    minilm = tr.AutoTokenizer.from_pretrained(resolve_pretrained("sentence-transformers/all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    tiny = dict(TINY_TOWER)

    tr.BertModel(tr.BertConfig(vocab_size=minilm.vocab_size, max_position_embeddings=64, **tiny, **NO_DROPOUT)
                 ).save_pretrained(root / "bert")
    minilm.save_pretrained(root / "bert")

    tr.CLIPModel(tr.CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, **tiny),
                               vision_config=dict(image_size=32, patch_size=8, **tiny), projection_dim=16)
                 ).save_pretrained(root / "clip")
    tr.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip")
    save_clip_tokenizer(root / "clip")

    tr.SiglipModel(tr.SiglipConfig(text_config=dict(vocab_size=49408, max_position_embeddings=16, **tiny),
                                   vision_config=dict(image_size=32, patch_size=8, **tiny))
                   ).save_pretrained(root / "siglip")
    tr.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "siglip")
    save_clip_tokenizer(root / "siglip")

    audio = dict(spec_size=64, num_mel_bins=16, window_size=4, hidden_size=32, patch_embeds_hidden_size=16,
                 depths=[1, 1], num_attention_heads=[2, 2], projection_dim=16)
    text = dict(vocab_size=minilm.vocab_size, pad_token_id=minilm.pad_token_id, hidden_size=16, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=32, projection_dim=16, **NO_DROPOUT)
    tr.ClapModel(tr.ClapConfig(text_config=text, audio_config=audio, projection_dim=16)).save_pretrained(root / "clap")
    clap_features = tr.ClapFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=160, max_length_s=1,
                                            fft_window_size=400, frequency_max=8000, truncation="rand_trunc")
    clap_features.save_pretrained(root / "clap")
    minilm.save_pretrained(root / "clap")

    tr.ASTModel(tr.ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             num_mel_bins=32, max_length=64, frequency_stride=16, time_stride=16)
                ).save_pretrained(root / "ast")
    tr.ASTFeatureExtractor(num_mel_bins=32, max_length=64).save_pretrained(root / "ast")

    tr.WhisperModel(tr.WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=32, max_source_positions=50, vocab_size=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).save_pretrained(root / "whisper")
    tr.WhisperFeatureExtractor(feature_size=32, chunk_length=1).save_pretrained(root / "whisper")

    wave = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
                conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                **WAVE_NO_DROPOUT)
    tr.Wav2Vec2Model(tr.Wav2Vec2Config(feat_extract_norm="layer", **wave)).save_pretrained(root / "wav2vec2")
    tr.HubertModel(tr.HubertConfig(feat_extract_norm="group", **wave)).save_pretrained(root / "hubert")
    for name in ("wav2vec2", "hubert"):
        tr.Wav2Vec2FeatureExtractor(return_attention_mask=name == "wav2vec2").save_pretrained(root / name)


def save_open_clip_assets(root: Path, names=tuple(OPEN_CLIP)) -> None:
    """The tiny open_clip architectures as ``local-dir:`` folders (config + weights), as open_clip exports them."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    for name in names:
        model_cfg = OPEN_CLIP[name]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
        torch.manual_seed(0)
        net = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "open_clip_model.safetensors"))


def tone(freq: float, seconds: float = 1.0, rate: int = 16000) -> bytes:
    import soundfile as sf

    t = np.arange(int(rate * seconds)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def ecg_members(i: int) -> dict[str, bytes]:
    """A 2-lead, 3 s record at 100 Hz: beats at a rate that depends on ``i``."""
    from mmalign.modalities.signals import Signal, encode_signal

    t = np.arange(300) / 100
    beat = np.sin(2 * np.pi * (0.8 + 0.2 * i) * t) ** 16
    members = encode_signal(Signal(np.stack([beat, 0.5 * beat + 0.1 * np.cos(t)]).astype(np.float32), 100.0))
    return {f"ecg.{ext}": data for ext, data in members.items()}


def write_matrix_shards(root: Path) -> str:
    """Two shards of 4 samples, each sample with every modality the matrix trains (image, caption, audio, ECG)."""
    samples = []
    for i in range(8):
        shape, colour = SHAPES[i % len(SHAPES)], list(COLOURS)[(i // len(SHAPES)) % len(COLOURS)]
        samples.append({"__key__": f"s{i:03d}", "image.png": shape_png(i), "text.txt": f"a {colour} {shape}",
                        "audio.wav": tone(220 * (1 + i % 4) + 30 * i), "label.txt": shape, **ecg_members(i)})
    return "::".join(write_shard(root / f"matrix-{k}.tar", samples[4 * k: 4 * k + 4]) for k in range(2))


def build_assets(root: Path) -> str:
    """Every checkpoint folder and the shards; returns the shards' url list."""
    save_hf_assets(root)
    save_open_clip_assets(root)
    return write_matrix_shards(root)


# ------------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One recipe of the matrix. ``modalities`` name asset folders as ``{root}/name``; ``two_process``: ``equal``
    (the same losses and weights as one process) or ``trains`` (BatchNorm towers); ``export``: the format to check."""

    name: str
    modalities: dict
    loss: dict = field(default_factory=lambda: {"name": "clip"})
    train: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    two_process: str = "equal"
    export: str | None = None

    @property
    def towers(self) -> set[tuple[str, str]]:
        """(kind, tower) of every modality."""
        return {(section.get("kind", name), section["tower"]) for name, section in self.modalities.items()}

    @property
    def bf16(self) -> bool:
        return self.train.get("precision") == "bf16"


BERT = {"tower": "hf", "model": "{root}/bert", "max_length": 16}
IMAGE = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
ECG = {"kind": "timeseries", "channels": 2, "sample_rate": 100.0, "window_s": 2.0}
MEL = {"clip_seconds": 0.5, "n_mels": 16}
OPEN_CLIP_VIT = "local-dir:{root}/oc_vit"

CASES = [
    Case("open_clip_vit", {"image": {"tower": "open_clip", "model": OPEN_CLIP_VIT, "image_size": 48},
                           "text": {"tower": "open_clip", "model": OPEN_CLIP_VIT}}, export="open_clip"),
    Case("open_clip_convnext", {"image": {"tower": "open_clip", "model": "local-dir:{root}/oc_convnext"},
                                "text": {"tower": "open_clip", "model": "local-dir:{root}/oc_convnext",
                                         "lora": {"r": 2, "alpha": 4}}},
         loss={"name": "chunked_clip", "kwargs": {"chunk_size": 4}}, export="open_clip"),
    Case("open_clip_resnet", {"image": {"tower": "open_clip", "model": "local-dir:{root}/oc_resnet"},
                              "text": {**BERT, "lock": True}}, two_process="trains"),
    Case("timm_vit", {"image": {"tower": "timm", "model": "test_vit", "image_size": 32, "lock": True,
                                "unlock_norms": True, **IMAGE},
                      "text": {"tower": "hf_clip", "model": "{root}/clip"}}, train={"precision": "bf16"}),
    Case("timm_convnext", {"image": {"tower": "timm", "model": "test_convnext", "image_size": 32, **IMAGE},
                           "text": BERT}, train={"gradcache_chunk": 2}),
    Case("clip", {"image": {"tower": "hf_clip", "model": "{root}/clip", "lock": True, "unlocked_layers": 1},
                  "text": {"tower": "hf_clip", "model": "{root}/clip"}}, export="hf"),
    Case("siglip", {"image": {"tower": "hf_clip", "model": "{root}/siglip"},
                    "text": {"tower": "hf_clip", "model": "{root}/siglip"}}, loss={"name": "siglip"}, export="hf"),
    Case("clap", {"audio": {"tower": "hf_clip", "model": "{root}/clap"},
                  "text": {"tower": "hf_clip", "model": "{root}/clap"}}, two_process="trains", export="hf"),
    Case("ast", {"audio": {"tower": "hf", "model": "{root}/ast", "lora": {"r": 2, "alpha": 4}}, "text": BERT},
         export="hf"),
    Case("whisper", {"audio": {"tower": "hf", "model": "{root}/whisper"}, "text": {**BERT, "lock": True}},
         train={"precision": "bf16"}, export="hf"),
    Case("wav2vec2", {"audio": {"tower": "hf", "model": "{root}/wav2vec2", "clip_seconds": 0.5},
                      "text": {**BERT, "lock": True, "unlocked_layers": 1}},
         loss={"name": "chunked_clip", "kwargs": {"chunk_size": 4}}, export="hf"),
    Case("hubert", {"audio": {"tower": "hf", "model": "{root}/hubert", "clip_seconds": 0.5}, "text": BERT},
         train={"gradcache_chunk": 2}, export="hf"),
    Case("clap_audio", {"audio": {"tower": "hf", "model": "{root}/clap", "lock": True},
                        "text": {"tower": "hf_clip", "model": "{root}/clap"}}, export="hf"),
    Case("mel_cnn", {"audio": {"tower": "mel_cnn", **MEL, "tower_kwargs": {"width": 16, "depth": 2, "norm": "group"}},
                     "text": BERT}, train={"gradcache_chunk": 2}),
    Case("resnet1d", {"ecg": {"tower": "resnet1d", **ECG, "tower_kwargs": {"widths": [8, 16], "depths": [1, 1]}},
                      "text": BERT}, two_process="trains"),
    Case("patch_transformer", {"ecg": {"tower": "patch_transformer", **ECG,
                                       "tower_kwargs": {"patch_size": 25, "dim": 16, "depth": 1, "heads": 2}},
                               "text": BERT},
         loss={"name": "chunked_clip", "kwargs": {"chunk_size": 4}}, train={"precision": "bf16"}),
    Case("flatten", {"ecg": {"tower": "flatten", **ECG, "output_norm": "layernorm"}, "text": BERT},
         model={"logit_scale": {"learn": "temperature", "max": None}}),
    Case("coca_decoder", {"image": {"tower": "small_cnn", "image_size": 16, **IMAGE,
                                    "tower_kwargs": {"width": 8, "depth": 2, "norm": "group"}},
                          "text": {"tower": "coca_decoder", "max_length": 12,
                                   "tower_kwargs": {"width": 16, "heads": 2, "layers": 2, "unimodal_layers": 1}}},
         loss={"name": "coca"}, model={"caption": {"context": "image", "n_queries": 4, "heads": 2}},
         train={"channels_last": True}),
    Case("open_clip_coca", {"image": {"tower": "open_clip", "model": "coca_ViT-B-32", "proj": "none",
                                      "tower_kwargs": OPEN_CLIP_COCA},
                            "text": {"tower": "open_clip_coca", "model": "coca_ViT-B-32", "proj": "none",
                                     "tower_kwargs": OPEN_CLIP_COCA}},
         loss={"name": "coca"}, model={"embed_dim": 32, "caption": {"context": "image", "n_queries": 0}},
         train={"eps": 0.1}),
]
BY_NAME = {case.name: case for case in CASES}
# the architectures the issue names, as (case, modality) -> what it is; test_tower_matrix checks each is there
ARCHITECTURES = {
    "open_clip ViT": ("open_clip_vit", "image"), "open_clip ConvNeXt": ("open_clip_convnext", "image"),
    "open_clip ResNet": ("open_clip_resnet", "image"), "open_clip text": ("open_clip_vit", "text"),
    "timm ViT": ("timm_vit", "image"), "timm CNN": ("timm_convnext", "image"), "HF BERT": ("timm_convnext", "text"),
    "CLIPModel": ("clip", "image"), "SiglipModel": ("siglip", "image"), "ClapModel audio": ("clap", "audio"),
    "ClapModel text": ("clap", "text"), "AST": ("ast", "audio"), "Whisper encoder": ("whisper", "audio"),
    "wav2vec2": ("wav2vec2", "audio"), "HuBERT": ("hubert", "audio"), "CoCa decoder": ("coca_decoder", "text"),
}


def _fill(value, root: Path):
    if isinstance(value, str):
        return value.replace("{root}", str(root))
    if isinstance(value, dict):
        return {k: _fill(v, root) for k, v in value.items()}
    return value


def recipe(case: Case, root: Path, run_dir: Path, shards: str, processes: int) -> dict:
    """The case's recipe for ``processes`` processes (each reading ``BATCH / processes`` rows from its own shard).

    Adam's first step moves a weight by lr * g / (|g| + eps): near g = 0 that multiplies the gradient's roundoff
    (which differs between 1 and 2 processes) by lr / eps; eps 1e-3 keeps it at 10. open_clip's CoCa decoder projects
    onto all 49,408 tokens, most of which get gradients of about 1e-5 (tokens no caption holds): its case uses 0.1.
    """
    model = {"embed_dim": EMBED_DIM, **case.model, "modalities": _fill(case.modalities, root)}
    train = {"steps": STEPS, "lr": 0.01, "eps": 1e-3, "warmup_steps": 0, "checkpoint_every": STEPS // 2,
             "log_every": 1, "device": "cpu", **case.train}
    return {"run_dir": str(run_dir), "seed": 0, "model": model, "loss": case.loss, "train": train,
            "data": {"train": shards, "batch_size": BATCH // processes, "shuffle_buffer": 0, "num_workers": 0}}
