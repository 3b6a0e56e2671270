"""Simulated 12-lead ECGs with report texts, for ``mmalign demo ecg`` (offline, ~1-2 min on 2 cores).

Each 10 s record (250 Hz) starts from one ECGSYN lead (McSharry et al. 2003, ``neurokit2.ecg_simulate``) at a heart
rate drawn inside one of three rate bands (bradycardia 40-56, normal 64-96, tachycardia 104-150 bpm; the gaps keep
labels away from the 60/100 bpm borders), regular (1 bpm RR variability) or irregular (12-20% of the rate). Twelve
leads are derived from it cheaply instead of simulating each (``method="multileads"`` costs ~1.4 s a record): every
lead views the source at its own angle (``cos a * s + sin a * Hilbert(s)``, so aVR comes out inverted and V1 mostly
negative), leads I and II are two such views and III, aVR, aVL, aVF follow from them by Einthoven's and Goldberger's
relations. Baseline wander, noise and (in the noisiest third) 50 Hz hum are added per lead.

Report texts are derived from the signal: the heart rate and the rhythm's regularity (RR coefficient of variation
> 0.06) are *measured* on lead II with ``neurokit2.ecg_clean`` + ``ecg_peaks`` (the rate falls back to the
simulation parameter only where fewer than 3 beats are found; ``rate_source`` in each record's metadata says
which); the noise words come from the simulation parameters. The label is the measured rate's class. To exercise
the preprocessing, a quarter of the records store their leads in a shuffled order and some hold only the six limb
leads (the recipe's ``leads`` list reorders by name and masks the missing ones).
"""
from __future__ import annotations

import json
import logging
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..optional import require
from .common import cached_build, write_samples

log = logging.getLogger(__name__)

RATE = 250  # Hz; neurokit2's ECGSYN can loop forever at 100 Hz (its RR upsampling ends in a zero there)
DURATION = 10
LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
CLASSES = {"bradycardia": (40, 56), "normal heart rate": (64, 96), "tachycardia": (104, 150)}
NOISE = {  # words -> (baseline wander mV, Gaussian noise mV, 50 Hz hum mV)
    "clean baseline": (0.02, 0.01, 0.0),
    "mild noise": (0.15, 0.04, 0.0),
    "noisy baseline with wander": (0.4, 0.08, 0.05),
}
PRECORDIAL = ((160, 0.8), (120, 1.1), (80, 1.2), (40, 1.3), (15, 1.1), (5, 0.9))  # V1..V6: (angle deg, gain)
IRREGULAR_CV = 0.06
REPORTS = [
    "{rhythm}, {bpm} bpm, {noise}",
    "{rate} at {bpm} beats per minute, {regularity} rhythm",
    "ECG report: {regularity} rhythm, {rate}, heart rate {bpm} bpm, {noise}",
    "heart rate {bpm} bpm ({rate}); {rhythm}; {noise}",
    "{noise}; {regularity} rhythm with {rate}, {bpm} bpm",
]
ZEROSHOT_TEMPLATES = ["an ECG showing {}", "{}", "ECG report: {}", "a heart rhythm with {}"]


def derive_leads(source: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """12 x T leads from one simulated lead: per-lead views of its analytic signal, limb leads by Einthoven."""
    from scipy.signal import hilbert

    analytic = hilbert(source - np.median(source))

    def view(angle: float, gain: float) -> np.ndarray:
        a = np.deg2rad(angle + rng.normal(0, 10))
        return gain * rng.uniform(0.85, 1.15) * (np.cos(a) * analytic.real + np.sin(a) * analytic.imag)

    lead_1, lead_2 = view(30, 0.7), view(0, 1.0)
    limb = [lead_1, lead_2, lead_2 - lead_1, -(lead_1 + lead_2) / 2, lead_1 - lead_2 / 2, lead_2 - lead_1 / 2]
    return np.stack(limb + [view(a, g) for a, g in PRECORDIAL])


def add_noise(leads: np.ndarray, noise: str, rng: np.random.Generator) -> np.ndarray:
    wander, sigma, hum = NOISE[noise]
    t = np.arange(leads.shape[1]) / RATE
    breath = np.sin(2 * np.pi * rng.uniform(0.15, 0.4) * t + rng.uniform(0, 2 * np.pi))
    out = leads + wander * rng.uniform(0.5, 1.0, (len(leads), 1)) * breath
    out += sigma * rng.standard_normal(leads.shape)
    if hum:
        out += hum * np.sin(2 * np.pi * 50 * t + rng.uniform(0, 2 * np.pi))
    return out


def measure_rhythm(lead: np.ndarray, fallback_bpm: float) -> tuple[float, float, str]:
    """(bpm, RR coefficient of variation, source) from R peaks of ``lead``; the simulation rate if < 3 beats."""
    import neurokit2 as nk

    _, info = nk.ecg_peaks(nk.ecg_clean(lead, sampling_rate=RATE), sampling_rate=RATE)
    peaks = np.asarray(info["ECG_R_Peaks"])
    if len(peaks) < 3:
        return fallback_bpm, 0.0, "simulation"
    rr = np.diff(peaks) / RATE
    return 60.0 / rr.mean(), float(rr.std() / rr.mean()), "ecg_peaks"


def rate_class(bpm: float) -> str:
    return "bradycardia" if bpm < 60 else "tachycardia" if bpm > 100 else "normal heart rate"


def simulate(spec: dict) -> dict:
    """One record: signal (leads x time, float16), its lead names and what the report says."""
    import neurokit2 as nk

    rng = np.random.default_rng(spec["seed"])
    hr_std = spec["hr"] * rng.uniform(0.12, 0.2) if spec["irregular"] else 1.0
    source = nk.ecg_simulate(duration=DURATION, sampling_rate=RATE, heart_rate=spec["hr"], heart_rate_std=hr_std,
                             method="ecgsyn", random_state=spec["seed"])
    leads = add_noise(derive_leads(source, rng), spec["noise"], rng)
    bpm, cv, source_of_rate = measure_rhythm(leads[1], spec["hr"])
    names = list(LEADS[:6] if spec["limb_only"] else LEADS)
    order = rng.permutation(len(names)) if spec["shuffle"] else np.arange(len(names))
    return {"signal": leads[order].astype(np.float16), "leads": [names[i] for i in order], "bpm": bpm, "cv": cv,
            "rate_source": source_of_rate}


def reports(rec: dict, noise: str, rng: random.Random, n: int) -> list[str]:
    rate = rate_class(rec["bpm"])
    irregular = rec["cv"] > IRREGULAR_CV
    if irregular:
        rhythm = f"irregular rhythm with {rate}"
    else:
        rhythm = {"bradycardia": "sinus bradycardia", "normal heart rate": "normal sinus rhythm",
                  "tachycardia": "sinus tachycardia"}[rate]
    words = {"rhythm": rhythm, "rate": rate, "bpm": round(rec["bpm"]), "noise": noise,
             "regularity": "irregular" if irregular else "regular"}
    return [t.format(**words) for t in rng.sample(REPORTS, n)]


def specs(n_per_class: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for low, high in CLASSES.values():
        for _ in range(n_per_class):
            out.append({"hr": rng.uniform(low, high), "irregular": rng.random() < 0.3,
                        "noise": rng.choice(list(NOISE)), "limb_only": rng.random() < 0.15,
                        "shuffle": rng.random() < 0.25, "seed": rng.randrange(2**31)})
    rng.shuffle(out)
    return out


def build(out_dir: Path, seed: int = 0, n_train_per_class: int = 200, n_test_per_class: int = 50,
          reports_per_record: int = 3, workers: int = 2) -> dict:
    def _build(out_dir: Path) -> dict:
        from ..modalities.signals import Signal, encode_signal

        require("neurokit2", "demo", "the ECG demo data")  # here, not first in the worker processes
        all_specs = {"train": specs(n_train_per_class, seed), "test": specs(n_test_per_class, seed + 1)}
        text_rng = random.Random(seed)
        paths = {}
        with ProcessPoolExecutor(workers) as pool:
            for split, split_specs in all_specs.items():
                records = list(pool.map(simulate, split_specs, chunksize=8))
                samples = []
                for i, (spec, rec) in enumerate(zip(split_specs, records)):
                    signal = Signal(rec["signal"], float(RATE), tuple(rec["leads"]), ("mV",) * len(rec["leads"]))
                    members = encode_signal(signal, bpm=round(rec["bpm"], 1), rr_cv=round(rec["cv"], 3),
                                            rate_source=rec["rate_source"], simulated_bpm=round(spec["hr"], 1))
                    samples.append({"__key__": f"{split}{i:05d}", "ecg.npy": members["npy"],
                                    "ecg.json": members["json"],
                                    "text.json": json.dumps(reports(rec, spec["noise"], text_rng,
                                                                    reports_per_record)).encode(),
                                    "label.txt": rate_class(rec["bpm"]).encode()})
                moved = sum(rate_class(r["bpm"]) != rate_class(s["hr"]) for s, r in zip(split_specs, records))
                err = np.mean([abs(r["bpm"] - s["hr"]) for s, r in zip(split_specs, records)])
                log.info("ecg %s: %d records, measured rate vs simulated: mean |diff| %.1f bpm, %d changed class",
                         split, len(records), err, moved)
                paths[split] = write_samples(samples, out_dir, split, 200)
        (out_dir / "classes.txt").write_text("\n".join(CLASSES) + "\n")
        (out_dir / "templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
        return {**paths, "classes": str(out_dir / "classes.txt"), "templates": str(out_dir / "templates.txt")}

    version = f"ecg-v1-{seed}-{n_train_per_class}-{n_test_per_class}-{reports_per_record}"
    return cached_build(out_dir, version, _build)
