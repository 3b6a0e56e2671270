"""Audio modality: decoding, resampling, crops, augmentation, towers (own and HF from local folders), shards, CLI."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from mmalign.config import ModelConfig, from_dict
from mmalign.errors import ConfigError, DataError
from mmalign.model import AlignmentModel
from mmalign.modalities.audio import add_noise, crop_starts, frame_mask

from conftest import last_json, run_in_process, write_pairs_csv



def tone(freq: float = 440.0, seconds: float = 0.5, rate: int = 16000, fmt: str = "WAV", channels: int = 1,
         amplitude: float = 0.3, sweep: float = 0.0) -> bytes:
    """A sine tone (rising by ``sweep`` Hz per second) encoded with soundfile; with ``channels`` > 1 the tone is on
    channel 0 and the others are silent."""
    import soundfile as sf

    t = np.arange(int(rate * seconds)) / rate
    wave = np.zeros((len(t), channels), dtype=np.float32)
    wave[:, 0] = amplitude * np.sin(2 * np.pi * (freq * t + sweep * t**2 / 2))
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt)
    return buf.getvalue()


def audio_model(embed_dim: int = 8, **audio) -> AlignmentModel:
    audio = {"tower": "mel_cnn", "clip_seconds": 0.5, "n_mels": 16,
             "tower_kwargs": {"width": 16, "depth": 2}, **audio}
    return AlignmentModel(from_dict(ModelConfig, {"embed_dim": embed_dim, "modalities": {"audio": audio}}))


def peak_hz(wave: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(wave).abs()
    return spectrum.argmax().item() * rate / wave.shape[0]


# ------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_resampling_gives_the_towers_rate(rate):
    modality = audio_model().modalities["audio"]
    wave = modality.decode(tone(440, 0.5, rate), "wav")
    assert modality.rate == 16000
    assert abs(wave.shape[0] - 8000) <= 1
    assert peak_hz(wave, 16000) == pytest.approx(440, abs=4)


@pytest.mark.parametrize("fmt", ["FLAC", "OGG", "MP3"])
def test_decodes_compressed_formats(fmt):
    import soundfile as sf

    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile cannot write {fmt}")
    modality = audio_model().modalities["audio"]
    wave = modality.decode(tone(440, 0.5, 22050, fmt), fmt.lower())
    assert abs(wave.shape[0] - 8000) <= 600  # mp3 adds encoder delay/padding
    assert peak_hz(wave, 16000) == pytest.approx(440, abs=6)


def test_mixdown_and_channel_selection():
    stereo = tone(440, 0.5, 16000, channels=2, amplitude=0.4)
    mixed = audio_model().modalities["audio"].decode(stereo, "wav")
    first = audio_model(channel=0).modalities["audio"].decode(stereo, "wav")
    assert mixed.abs().max().item() == pytest.approx(0.2, abs=1e-3)
    assert first.abs().max().item() == pytest.approx(0.4, abs=1e-3)
    with pytest.raises(DataError, match="silent"):
        audio_model(channel=1).modalities["audio"].decode(stereo, "wav")
    with pytest.raises(DataError, match="has 2 channel"):
        audio_model(channel=2).modalities["audio"].decode(stereo, "wav")


def test_unusable_files_raise_clear_errors():
    modality = audio_model().modalities["audio"]
    with pytest.raises(DataError, match=r"cannot decode audio \(wav\)"):
        modality.decode(b"RIFF\x00\x00not really a wav file", "wav")
    with pytest.raises(DataError, match=r"audio \(wav\) is empty \(0 samples\)"):
        modality.decode(tone(seconds=0.0), "wav")
    with pytest.raises(DataError, match="silent"):
        modality.decode(tone(amplitude=0.0), "wav")


# ------------------------------------------------------------------------------------------- crops, masks, augmentation


def test_crop_starts_are_deterministic_and_cover_the_clip():
    assert crop_starts(100, 40, "start") == [0]
    assert crop_starts(100, 40, "center") == [30]
    assert crop_starts(100, 40, "windows", 3) == [0, 30, 60]
    assert crop_starts(10, 40, "windows", 3) == [0, 0, 0]  # short clip: every window is the padded clip


def test_frame_mask_and_noise_snr():
    mask = frame_mask(torch.tensor([1.0, 0.5, 0.01]), 10)
    assert mask.sum(1).tolist() == [10, 5, 1]
    torch.manual_seed(0)
    signal = torch.sin(torch.linspace(0, 2000, 200_000))
    noise = add_noise(signal, 10.0) - signal
    assert 10 * torch.log10(signal.pow(2).mean() / noise.pow(2).mean()).item() == pytest.approx(10.0, abs=0.1)


def test_short_clips_are_padded_with_a_mask_and_long_clips_cropped():
    modality = audio_model(clip_seconds=1.0).modalities["audio"]
    short = modality.transform(modality.decode(tone(seconds=0.25), "wav"), train=False)
    long = modality.transform(modality.decode(tone(seconds=3.0), "wav"), train=False)
    assert short["input"].shape == long["input"].shape == (1, 16, 101)
    assert short["valid"].item() == pytest.approx(0.25) and long["valid"].item() == 1.0


AUGMENT = {"gain_db": [-6, 6], "noise_snr_db": [10, 20], "noise_p": 1.0, "shift_s": 0.05,
           "freq_masks": 2, "freq_mask_width": 4, "time_masks": 2, "time_mask_width": 5}


@pytest.mark.parametrize("eval_crop", ["center", "windows"])
def test_eval_embedding_is_deterministic_and_augmentation_is_training_only(eval_crop):
    model = audio_model(augment=AUGMENT, eval_crop=eval_crop, eval_windows=3).eval()
    modality = model.modalities["audio"]
    data = tone(330, 1.3, sweep=400)

    def embed(train: bool) -> torch.Tensor:
        item = modality.transform(modality.decode(data, "wav"), train)
        return model.encode("audio", modality.collate([item]))

    with torch.no_grad():
        first, second = embed(False), embed(False)
        assert torch.equal(first, second)
        assert not torch.equal(embed(True), embed(True))  # random crop + augmentation
    if eval_crop == "windows":
        item = modality.transform(modality.decode(data, "wav"), train=False)
        assert item["input"].shape[0] == 3 and not torch.equal(item["input"][0], item["input"][2])


@pytest.mark.parametrize("audio", [
    {"features": "fbank"},
    {"tower_kwargs": {"width": 16, "depth": 2, "transformer_layers": 1}},
])
def test_own_tower_variants_train(audio):
    model = audio_model(augment=AUGMENT, **audio).train()
    modality = model.modalities["audio"]
    batch = modality.collate([modality.transform(modality.decode(tone(f), "wav"), True) for f in (300, 500, 700)])
    emb = model.encode("audio", batch)
    emb.sum().backward()
    assert emb.shape == (3, 8) and torch.allclose(emb.norm(dim=-1), torch.ones(3))


def test_caption_decoder_reads_audio_frames():
    """CoCa on audio (audio captioning): the decoder cross-attends to the tower's frames; padded frames masked."""
    from mmalign.losses import build_loss

    audio = {"tower": "mel_cnn", "clip_seconds": 0.5, "n_mels": 16,
             "tower_kwargs": {"width": 16, "depth": 2, "transformer_layers": 1}}
    text = {"tower": "coca_decoder", "max_length": 12, "tower_kwargs": {"width": 16, "heads": 2, "layers": 2}}
    model = AlignmentModel(from_dict(ModelConfig, {
        "embed_dim": 16, "modalities": {"audio": audio, "text": text},
        "caption": {"context": "audio", "text": "text", "n_queries": 4, "heads": 2}}))
    audio_mod, text_mod = model.modalities["audio"], model.modalities["text"]
    clips = [audio_mod.transform(audio_mod.decode(tone(f, s), "wav"), True) for f, s in ((220, 0.2), (880, 0.6))]
    batch = {"audio": audio_mod.collate(clips), "text": text_mod.collate(["a low tone", "a high tone"])}
    tokens, mask = model.adapters["audio"].tower.forward_tokens(batch["audio"])
    assert tokens.shape[-1] == 16 and mask.sum(1).tolist() == [3, 7]  # 0.2 s and 0.5 s of signal in 7 frames
    out = build_loss("coca", model.names)(model(batch), logit_scale=model.logit_scale())
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.adapters["audio"].tower.stem[0].weight.grad is not None
    model.eval()
    assert len(model.generate_captions(batch["audio"])) == 2


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="eval_crop"):
        audio_model(eval_crop="middle")
    with pytest.raises(ConfigError, match="features must be logmel or fbank"):
        audio_model(features="mfcc")
    with pytest.raises(ConfigError, match=r"augment.gain_db must be \[low, high\]"):
        audio_model(augment={"gain_db": [6, -6]})
    with pytest.raises(ConfigError, match=r"unknown key 'modalities.audio.augment.gain' \(did you mean 'gain_db'\?\)"):
        audio_model(augment={"gain": [0, 1]})


# ------------------------------------------------------------------------------------------- HF towers, local folders


def save_tiny_hf(kind: str, path) -> str:
    """A tiny randomly initialised HF audio model with its feature extractor, saved to ``path``."""
    import transformers as tr

    if kind == "ast":
        model = tr.ASTModel(tr.ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, num_mel_bins=32, max_length=64, frequency_stride=16,
                                         time_stride=16))
        fe = tr.ASTFeatureExtractor(num_mel_bins=32, max_length=64)
    elif kind == "whisper":
        model = tr.WhisperModel(tr.WhisperConfig(
            d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=32, max_source_positions=50, vocab_size=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))
        fe = tr.WhisperFeatureExtractor(feature_size=32, chunk_length=1)
    elif kind == "clap":  # a full ClapModel checkpoint: the tower is its audio half with the audio projection
        audio = dict(spec_size=64, num_mel_bins=16, window_size=4, hidden_size=32, patch_embeds_hidden_size=16,
                     depths=[1, 1], num_attention_heads=[2, 2], projection_dim=16)
        text = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    projection_dim=16)
        model = tr.ClapModel(tr.ClapConfig(text_config=text, audio_config=audio, projection_dim=16))
        fe = tr.ClapFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=160, max_length_s=1,
                                     fft_window_size=400, frequency_max=8000, truncation="rand_trunc")
    else:
        model = tr.Wav2Vec2Model(tr.Wav2Vec2Config(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
            conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2))
        fe = tr.Wav2Vec2FeatureExtractor(return_attention_mask=False)
    model.save_pretrained(path)
    fe.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kind,tower", [("ast", "hf"), ("whisper", "hf"), ("clap", "hf"), ("clap", "hf_clip"),
                                        ("wav2vec2", "hf")])
def test_hf_tower_loads_from_local_folder_trains_and_round_trips(kind, tower, tmp_path):
    folder = save_tiny_hf(kind, tmp_path / kind)
    augment = {} if kind == "wav2vec2" else {"freq_masks": 1, "freq_mask_width": 2, "time_masks": 1}
    model = audio_model(tower=tower, model=folder, clip_seconds=0.5, augment={"gain_db": [-3, 3], **augment},
                        eval_crop="windows", eval_windows=2, tower_kwargs={})
    modality = model.modalities["audio"]
    assert modality.rate == 16000
    batch = modality.collate([modality.transform(modality.decode(tone(f, 0.8, 22050), "wav"), True)
                              for f in (300, 600, 900, 1200)])
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    logits = model.encode("audio", batch) @ model.encode("audio", batch).T
    torch.nn.functional.cross_entropy(logits * 10, torch.arange(4)).backward()
    optimizer.step()
    tower_params = dict(model.adapters["audio"].tower.named_parameters())
    changed = [n for (n, p), b in zip(model.named_parameters(), before) if not torch.equal(p.detach(), b)]
    assert any(n.startswith("adapters.audio.tower.") for n in changed) and tower_params

    model.eval()
    item = modality.transform(modality.decode(tone(440, 0.8, 22050), "wav"), train=False)
    with torch.no_grad():
        expected = model.encode("audio", modality.collate([item]))
    model.save_pretrained(tmp_path / "saved")
    reloaded = AlignmentModel.from_pretrained(tmp_path / "saved").eval()
    assert reloaded.config.modalities["audio"].model == str(tmp_path / "saved" / "audio")
    with torch.no_grad():
        again = reloaded.encode("audio", reloaded.modalities["audio"].collate([item]))
    assert torch.allclose(expected, again, atol=1e-5)


def test_hf_tower_resamples_to_its_rate_and_rejects_mismatched_settings(tmp_path, caplog):
    folder = save_tiny_hf("wav2vec2", tmp_path / "w2v")
    with caplog.at_level("WARNING", logger="mmalign.modalities.audio"):
        model = audio_model(tower="hf", model=folder, sample_rate=22050, clip_seconds=0.5)
    assert "trained on 16000 Hz audio: audio is resampled to 16000 Hz" in caplog.text
    modality = model.modalities["audio"]
    assert modality.rate == model.config.modalities["audio"].sample_rate == 16000
    assert peak_hz(modality.decode(tone(1000, 0.5, 22050), "wav"), 16000) == pytest.approx(1000, abs=4)
    with pytest.raises(ConfigError, match="SpecAugment needs spectrogram"):
        audio_model(tower="hf", model=folder, augment={"time_masks": 1})
    with pytest.raises(ConfigError, match="longer than"):
        audio_model(tower="hf", model=save_tiny_hf("whisper", tmp_path / "wh"), clip_seconds=2.0)


# ------------------------------------------------------------------------------------------- shards, pipeline, CLI

TONES = {"low": 220.0, "middle": 440.0, "high": 880.0}


@pytest.fixture(scope="module")
def tone_dataset(tmp_path_factory) -> dict:
    """WAV files at three sample rates + a CSV with two captions per clip; one corrupt and one silent file."""
    root = tmp_path_factory.mktemp("tones")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(36):
        name = list(TONES)[i % 3]
        rate = (8000, 22050, 44100)[(i // 3) % 3]
        path = root / f"clip{i:02d}.wav"
        path.write_bytes(tone(TONES[name] * rng.uniform(0.97, 1.03), rng.uniform(0.3, 0.9), rate))
        rows += [{"audio": path.name, "text": f"a {name} tone", "label": name},
                 {"audio": path.name, "text": f"a {name} pitched beep", "label": name}]
    (root / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage")
    (root / "silent.wav").write_bytes(tone(amplitude=0.0))
    rows += [{"audio": "corrupt.wav", "text": "a low tone", "label": "low"},
             {"audio": "silent.wav", "text": "a high tone", "label": "high"}]
    write_pairs_csv(root / "pairs.csv", rows)
    (root / "classes.txt").write_text("\n".join(TONES) + "\n")
    (root / "templates.txt").write_text("a {} tone\na {} pitched beep\n")
    return {"root": root, "csv": root / "pairs.csv", "classes": root / "classes.txt",
            "templates": root / "templates.txt"}


def test_pipeline_skips_and_counts_bad_audio(tone_dataset, tmp_path):
    from mmalign.data import expand_urls, iterate_batches
    from mmalign.data.shards import write_shards
    from mmalign.demo_data.common import write_samples

    summary = write_shards(tone_dataset["csv"], tmp_path / "shards", shard_size=100)
    assert summary["samples"] == 36 and summary["skipped"] == {"bad audio": 2}  # packing decodes every file
    reasons = " ".join(f["reason"] for f in summary["skipped_files"])
    assert "silent" in reasons and "cannot decode" in reasons
    bad = write_samples([{"__key__": name, "audio.wav": (tone_dataset["root"] / f"{name}.wav").read_bytes(),
                          "text.txt": b"a tone"} for name in ("corrupt", "silent")], tmp_path / "bad", "bad", 10)
    model = audio_model()
    skips: dict = {}
    urls = expand_urls(summary["shards"]) + expand_urls(bad)  # shards written by other tools may hold bad files
    batches = list(iterate_batches(urls, model.modalities, 16, train=False, skips=skips))
    assert sum(len(b["__key__"]) for b in batches) == 36
    assert skips["counts"] == {"bad audio": 2}
    assert any("silent" in e for e in skips["examples"]["bad audio"])
    assert any("cannot decode" in e for e in skips["examples"]["bad audio"])


def test_folder_of_audio_files_becomes_shards(tmp_path):
    from mmalign.data.shards import write_shards

    for name, freq in TONES.items():
        (tmp_path / "src" / name).mkdir(parents=True)
        (tmp_path / "src" / name / "a.flac").write_bytes(tone(freq, fmt="FLAC"))
    summary = write_shards(tmp_path / "src", tmp_path / "out")
    import webdataset as wds

    samples = list(wds.WebDataset(summary["shards"].replace("{000000..000000}", "000000"), shardshuffle=False))
    assert sorted(s["label.txt"].decode() for s in samples) == sorted(TONES)
    assert all("audio.flac" in s for s in samples)


@pytest.mark.slow
def test_cli_shards_train_eval_zeroshot(tone_dataset, tiny_text_model, tmp_path):
    out = last_json(run_in_process("data", "shards", "--from", str(tone_dataset["csv"]), "--out",
                                   str(tmp_path / "shards")))
    shards = out["shards"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""run_dir: {tmp_path / 'run'}
model:
  embed_dim: 16
  modalities:
    audio: {{tower: mel_cnn, tower_kwargs: {{width: 16, depth: 2}}, clip_seconds: 0.5, n_mels: 16,
             augment: {{gain_db: [-3, 3], time_masks: 1}}}}
    text: {{tower: hf, model: '{tiny_text_model}', max_length: 16, lock: true, cache_frozen: true}}
data: {{train: '{shards}', batch_size: 8, shuffle_buffer: 16, num_workers: 0}}
train: {{steps: 8, lr: 0.003, warmup_steps: 2, checkpoint_every: 4, log_every: 2}}
eval:
  batch_size: 16
  zeroshot: {{data: '{shards}', classes: '{tone_dataset["classes"]}', templates: '{tone_dataset["templates"]}'}}
  retrieval: {{data: '{shards}', query: audio, gallery: text}}
""")
    assert out["skipped"] == {"bad audio": 2}  # the corrupt and the silent clip are left out, and listed
    result = last_json(run_in_process("train", str(recipe)))
    assert result["steps"] == 8 and result["skipped"] == {}
    for key in ("zeroshot_top1", "retrieval_a2t_R@1", "retrieval_t2a_R@10", "retrieval_a2t_mAP@10"):
        assert 0.0 <= result[key] <= 1.0
    assert result["retrieval_n"] == 36
    evaluated = last_json(run_in_process("eval", "zeroshot", "--model", str(tmp_path / "run"), "--data", shards,
                                         "--classes", str(tone_dataset["classes"]), "--templates",
                                         str(tone_dataset["templates"])))
    assert evaluated["zeroshot_top1"] == pytest.approx(result["zeroshot_top1"])
    assert evaluated["zeroshot_n"] == 36
    assert json.loads((tmp_path / "run" / "results.json").read_text())["zeroshot_n"] == 36


def test_spoken_words_builder(tmp_path):
    """The demo's data builder on a handful of clips (needs the Debian package espeak-ng)."""
    import shutil

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make sysdeps)")
    from mmalign.demo_data.spoken_words import build

    paths = build(tmp_path, train_clips=8, test_clips=4)
    model = audio_model(clip_seconds=1.0)
    import webdataset as wds

    samples = list(wds.WebDataset(paths["test"].replace("{000000..000000}", "000000"), shardshuffle=False))
    assert len(samples) == 4
    for s in samples:
        wave = model.modalities["audio"].decode(s["audio.flac"], "flac")
        assert 0.1 < wave.shape[0] / 16000 < 2.0
        captions = json.loads(s["text.json"])
        assert len(captions) == 3 and all(s["label.txt"].decode() in c for c in captions)
