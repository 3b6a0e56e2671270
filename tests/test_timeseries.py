"""Time series modality: readers (WFDB, npy, CSV) through the shard CLI, preprocessing, errors, towers, training."""
from __future__ import annotations

import csv
import io
import json
import tarfile

import numpy as np
import pytest
import torch

from conftest import last_json, run_in_process, write_pairs_csv
from mmalign.config import from_dict
from mmalign.data import iterate_batches
from mmalign.data.pipeline import seeded
from mmalign.errors import ConfigError, DataError
from mmalign.losses import clip_loss
from mmalign.modalities import ModalityAdapter
from mmalign.modalities.signals import make_signal, read_signal_file
from mmalign.modalities.timeseries import TimeseriesConfig, TimeseriesModality

LEADS12 = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
CLASSES = {"slow": 50, "medium": 80, "fast": 130}


def modality(**kwargs) -> TimeseriesModality:
    cfg = from_dict(TimeseriesConfig, {"kind": "timeseries", "sample_rate": 50, "window_s": 2.0, **kwargs})
    return TimeseriesModality("ecg", cfg)


def beats(bpm: float, seconds: float = 3.0, rate: int = 250, leads: int = 2, seed: int = 0) -> np.ndarray:
    """An ECG-like signal: per beat a sharp R wave and a wider T wave; leads scaled differently, light noise."""
    t = np.arange(int(seconds * rate)) / rate
    one = np.zeros_like(t)
    for beat in np.arange(0.2, seconds, 60 / bpm):
        one += np.exp(-0.5 * ((t - beat) / 0.012) ** 2) + 0.3 * np.exp(-0.5 * ((t - beat - 0.25) / 0.04) ** 2)
    rng = np.random.default_rng(seed)
    return np.stack([one * (1 + 0.2 * i) + 0.01 * rng.standard_normal(len(t)) for i in range(leads)])


@pytest.fixture(scope="module")
def signal_corpus(tmp_path_factory) -> dict:
    """A user's files (a WFDB record, npy + sidecar json, signal CSVs with a time column) -> ``mmalign data shards``."""
    import wfdb

    root = tmp_path_factory.mktemp("signals")
    rows = []
    record = beats(70, leads=3).T
    wfdb.wrsamp("rec0", fs=250, units=["mV"] * 3, sig_name=["I", "II", "V1"], p_signal=record, fmt=["16"] * 3,
                write_dir=str(root))
    rows.append({"ecg": "rec0.hea", "text": "a medium heart rate", "label": "medium"})
    for i in range(24):
        name = list(CLASSES)[i % 3]
        signal = beats(CLASSES[name] + i % 4, leads=2, seed=i)
        if i % 2:
            np.save(root / f"s{i}.npy", signal)
            (root / f"s{i}.json").write_text(json.dumps({"sampling_rate": 250, "leads": ["II", "I"]}))
            path = f"s{i}.npy"
        else:
            path = f"s{i}.csv"
            with open(root / path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["time", "I", "II"])
                writer.writerows([[t / 250, *signal[:, t]] for t in range(signal.shape[1])])
        rows.append({"ecg": path, "text": f"a {name} heart rate", "label": name})
    write_pairs_csv(root / "pairs.csv", rows)
    summary = last_json(run_in_process("data", "shards", "--from", str(root / "pairs.csv"), "--out",
                                       str(root / "shards"), "--shard-size", "10",
                                       "--no-shuffle"))  # keys in the CSV's order
    return {"root": root, "summary": summary}


def shard_samples(pattern: str) -> dict[str, dict]:
    from braceexpand import braceexpand

    samples: dict[str, dict] = {}
    for url in braceexpand(pattern):
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.mark.slow
def test_wfdb_npy_csv_round_trip_through_shards(signal_corpus):
    import wfdb

    samples = shard_samples(signal_corpus["summary"]["shards"])
    assert len(samples) == 25 and signal_corpus["summary"]["n_shards"] == 3
    m = modality(channels=3)
    sig = m.decode_member(samples["000000000"], "ecg.npy")
    record = wfdb.rdrecord(str(signal_corpus["root"] / "rec0"))
    assert np.array_equal(sig.data, record.p_signal.T.astype(np.float32))
    assert (sig.rate, sig.leads, sig.units) == (250.0, ("I", "II", "V1"), ("mV", "mV", "mV"))
    from_csv = m.decode_member(samples["000000001"], "ecg.npy")  # row 1 is s0.csv: rate from the time column
    assert from_csv.rate == 250.0 and from_csv.leads == ("I", "II")
    assert np.allclose(from_csv.data, beats(CLASSES["slow"], leads=2, seed=0), atol=1e-6)
    from_npy = m.decode_member(samples["000000002"], "ecg.npy")  # s1.npy with its sidecar json
    assert from_npy.leads == ("II", "I") and np.array_equal(from_npy.data, np.load(signal_corpus["root"] / "s1.npy"))


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "bad.hea").write_text("not a header\n")
    (tmp_path / "norate.csv").write_text("I,II\n1,2\n3,4\n")
    np.save(tmp_path / "cube.npy", np.ones((2, 2, 2)))
    for name, message in [("bad.hea", "cannot read WFDB record"), ("norate.csv", "no sampling rate"),
                          ("cube.npy", "expected channels x time")]:
        with pytest.raises(DataError, match=message) as err:
            read_signal_file(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)


def test_leads_are_selected_and_reordered_by_name():
    data = np.stack([np.linspace(1, 2, 200, dtype=np.float32) * v for v in (1.0, 2.0, 3.0)])
    sig = make_signal(data, {"sampling_rate": 50, "leads": ["V1", "i", "AVR"], "units": "uV"})
    out = modality(leads=["I", "aVR", "V1", "V6"], standardize=False).transform(sig, train=False)
    assert out["mask"].tolist() == [True, True, True, False]
    expected = torch.from_numpy(data[[1, 2, 0]] * 1e-3)[:, 50:150]  # microvolts -> mV, centred 2 s window
    assert torch.allclose(out["signal"][:3], expected) and not out["signal"][3].any()
    with pytest.raises(DataError, match="missing lead.*V6"):
        modality(leads=["I", "V6"], missing_leads="error").transform(sig, train=False)
    with pytest.raises(DataError, match="none of the leads V5, V6"):
        modality(leads=["V5", "V6"]).transform(sig, train=False)


def member_sample(data, meta) -> dict:
    """Raw shard members as another tool might write them: ``ecg.npy`` and (unless None) ``ecg.json``."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(data))
    sample = {"ecg.npy": buf.getvalue()}
    if meta is not None:
        sample["ecg.json"] = json.dumps(meta).encode()
    return sample


BAD = {
    "nan": (np.where(np.arange(200) == 7, np.nan, 1.0)[None].repeat(2, 0), {"sampling_rate": 50,
                                                                           "leads": ["I", "II"]}, r"NaN.*lead I\b"),
    "short": (np.ones((2, 60)), {"sampling_rate": 50}, r"too short: 1.20 s, the window is 2 s"),
    "3-d": (np.ones((2, 3, 200)), {"sampling_rate": 50}, r"shape \(2, 3, 200\); expected channels x time"),
    "lead names": (np.ones((3, 200)), {"sampling_rate": 50, "leads": ["I", "II"]}, "names 2 leads but the signal "
                                                                                   "has 3 channels"),
    "channels": (np.ones((3, 200)), {"sampling_rate": 50}, "3 channels; the modality expects 2"),
    "no rate": (np.ones((2, 200)), {"leads": ["I", "II"]}, "sampling_rate"),
    "no metadata": (np.ones((2, 200)), None, "no ecg.json metadata"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_signals_give_clear_errors(case):
    data, meta, message = BAD[case]
    m = modality(channels=2)
    with pytest.raises(DataError, match=message):
        m.transform(m.decode_member(member_sample(data, meta), "ecg.npy"), train=False)


def test_bad_samples_are_skipped_and_counted(tmp_path):
    from mmalign.demo_data.common import write_samples

    good = [{"__key__": f"ok{i}", **member_sample(np.random.randn(2, 200).astype(np.float32),
                                                  {"sampling_rate": 50})} for i in range(4)]
    bad = [{"__key__": case, **member_sample(*BAD[case][:2])} for case in ("nan", "short", "3-d")]
    shards = write_samples(good + bad, tmp_path, "mixed", 100)
    from mmalign.data import expand_urls

    skips: dict = {}
    batches = list(iterate_batches(expand_urls(shards), {"ecg": modality(channels=2)}, 8, train=False, skips=skips))
    assert sum(len(b["__key__"]) for b in batches) == 4
    assert skips["counts"] == {"bad ecg": 3}
    assert any("NaN" in e for e in skips["examples"]["bad ecg"])


def batch(m: TimeseriesModality, n: int, channels: int, train: bool = True) -> dict:
    leads = m.cfg.leads or [f"c{i}" for i in range(channels)]
    items = []
    for i in range(n):
        sig = make_signal(beats(60 + 10 * i, seconds=2.5, rate=100, leads=channels, seed=i),
                          {"sampling_rate": 100, "leads": list(leads)})
        with seeded(i):
            items.append(m.transform(sig, train))
    return m.collate(items)


@pytest.mark.parametrize("tower,tower_kwargs", [
    ("resnet1d", {"widths": [8, 16], "depths": [1, 1]}),
    ("patch_transformer", {"patch_size": 10, "dim": 16, "depth": 2, "heads": 2}),
])
@pytest.mark.parametrize("channels", [1, 12])
def test_towers_train_a_step_with_any_lead_count(tower, tower_kwargs, channels):
    torch.manual_seed(0)
    leads = {"leads": LEADS12} if channels == 12 else {"channels": 1}
    m = modality(tower=tower, tower_kwargs=tower_kwargs,
                 augment={"scale": [0.8, 1.2], "noise": 0.05, "baseline_wander": 0.1, "lead_dropout": 0.2,
                          "time_mask": 0.1}, **leads)
    adapter = ModalityAdapter(m, embed_dim=8)
    inputs = batch(m, 6, channels)
    assert inputs["signal"].shape == (6, channels, 100)
    targets = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    before = [p.detach().clone() for p in adapter.parameters()]
    loss = clip_loss(adapter(inputs), targets, torch.tensor(10.0))
    loss.backward()
    torch.optim.SGD(adapter.parameters(), lr=0.1).step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapter.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, adapter.parameters()))


@pytest.mark.parametrize("tower", ["resnet1d", "patch_transformer"])
def test_masked_leads_do_not_change_the_embedding(tower):
    torch.manual_seed(0)
    kwargs = {"patch_size": 10, "dim": 16, "depth": 1, "heads": 2} if tower == "patch_transformer" else {
        "widths": [8], "depths": [1]}
    m = modality(tower=tower, tower_kwargs=kwargs, leads=["I", "II", "V1"])
    net = m.build_tower().eval()
    inputs = batch(m, 3, 3, train=False)
    inputs["mask"][:, 2] = False
    noisy = {"signal": inputs["signal"].clone(), "mask": inputs["mask"]}
    noisy["signal"][:, 2] = torch.randn(3, 100)
    assert torch.allclose(net(inputs), net(noisy), atol=1e-5)


def test_augmentations_are_random_in_training_only():
    m = modality(leads=["I", "II", "V1"], augment={"scale": [0.5, 1.5], "noise": 0.1, "lead_dropout": 0.9,
                                                    "time_mask": 0.5, "baseline_wander": 0.3})
    sig = make_signal(beats(70, leads=3), {"sampling_rate": 250, "leads": ["I", "II", "V1"]})
    first, second = m.transform(sig, train=False), m.transform(sig, train=False)
    assert torch.equal(first["signal"], second["signal"]) and first["mask"].all()
    assert torch.allclose(first["signal"].mean(-1), torch.zeros(3), atol=1e-5)  # standardised per lead
    views = []
    for seed in range(20):
        with seeded(seed):
            views.append(m.transform(sig, train=True))
    assert all(v["mask"].sum() >= 1 for v in views) and any(v["mask"].sum() < 3 for v in views)
    assert all(not v["signal"][~v["mask"]].any() for v in views)
    assert not torch.equal(views[0]["signal"], views[1]["signal"])
    with seeded(3):
        again = m.transform(sig, train=True)
    assert torch.equal(again["signal"], views[3]["signal"])


def test_pretrained_tower_checkpoints_load(tmp_path):
    from safetensors.torch import save_file

    from mmalign.config import ModelConfig
    from mmalign.model import AlignmentModel

    kwargs = {"tower": "resnet1d", "tower_kwargs": {"widths": [8, 16], "depths": [1, 1]}, "leads": ["I", "II"]}
    model = AlignmentModel(from_dict(ModelConfig, {"embed_dim": 8, "modalities": {"ecg": {"kind": "timeseries",
                                                                                        **kwargs}}}))
    source = model.adapters["ecg"].tower.eval()
    model.save_pretrained(tmp_path / "run")
    save_file(source.state_dict(), str(tmp_path / "tower.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "tower.pt")
    inputs = batch(modality(**kwargs), 2, 2, train=False)
    for path in ("tower.safetensors", "tower.pt", "run/model.safetensors"):
        loaded = modality(**kwargs, pretrained=str(tmp_path / path)).build_tower().eval()
        assert torch.allclose(loaded(inputs), source(inputs)), path
    with pytest.raises(ConfigError, match="does not fit"):
        modality(tower="patch_transformer", leads=["I", "II"], pretrained=str(tmp_path / "tower.pt")).build_tower()
    with pytest.raises(ConfigError, match="shapes do not fit"):
        modality(**{**kwargs, "leads": ["I", "II", "III"]}, pretrained=str(tmp_path / "tower.pt")).build_tower()
    with pytest.raises(ConfigError, match="set leads"):
        modality()


@pytest.mark.slow
def test_cli_shards_train_eval_zeroshot(signal_corpus, tiny_text_model, tmp_path):
    root, shards = signal_corpus["root"], signal_corpus["summary"]["shards"]
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    recipe = tmp_path / "ecg.yaml"
    recipe.write_text(f"""run_dir: {tmp_path / 'run'}
model:
  embed_dim: 16
  modalities:
    ecg: {{kind: timeseries, tower: resnet1d, tower_kwargs: {{widths: [8, 16], depths: [1, 1]}}, leads: [I, II],
           sample_rate: 50, window_s: 2.0, bandpass: [0.5, 20], augment: {{noise: 0.05, lead_dropout: 0.2}}}}
    text: {{tower: hf, model: '{tiny_text_model}', max_length: 16, lock: true, cache_frozen: true}}
data: {{train: '{shards}', batch_size: 8, shuffle_buffer: 16, num_workers: 0}}
train: {{steps: 4, lr: 0.001, warmup_steps: 1, checkpoint_every: 4, log_every: 1}}
eval: {{batch_size: 16, retrieval: {{data: '{shards}', query: ecg, gallery: text}}}}
""")
    trained = last_json(run_in_process("train", str(recipe)))
    assert trained["steps"] == 4 and 0 <= trained["retrieval_e2t_R@1"] <= 1 and trained["skipped"] == {}
    result = last_json(run_in_process("eval", "zeroshot", "--model", str(tmp_path / "run"), "--data", shards,
                                      "--classes", str(root / "classes.txt")))
    assert result["zeroshot_n"] == 25 and 0 <= result["zeroshot_top1"] <= 1
