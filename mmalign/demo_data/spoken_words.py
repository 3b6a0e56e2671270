"""Audio-caption shards of spoken words synthesised offline with espeak-ng (Debian package ``espeak-ng``).

Each clip is one word (the ten digits, and ten command words in the training set) spoken by one of espeak-ng's
English voice variants with an accent, speed and pitch drawn at random; its captions say who speaks, how and what
("a woman saying seven quickly", "the word seven spoken slowly by a man with a Scottish accent"). Whole voice
variants are held out: the test set holds only the digits, spoken by voices never heard in training, for
zero-shot classification (10 classes) and audio-text retrieval. Clips are stored as FLAC at espeak-ng's native
22,050 Hz, so the training pipeline resamples them to the tower's rate. Synthesis runs in worker processes
through libespeak-ng (ctypes), the library the ``espeak-ng`` command wraps.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import io
import json
import random
import shutil
import subprocess
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..optional import require

from .common import cached_build, write_samples

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COMMANDS = ["yes", "no", "up", "down", "left", "right", "stop", "go", "on", "off"]
ACCENTS = {"en-us": "an American", "en": "a British", "en-gb-scotland": "a Scottish", "en-029": "a Caribbean",
           "en-gb-x-gbclan": "a Lancashire", "en-gb-x-gbcwmd": "a West Midlands"}
SPEEDS = {"slowly": (100, 130), "": (150, 185), "quickly": (220, 280)}  # words per minute
PITCHES = {"deep ": (5, 30), "": (40, 60), "high-pitched ": (70, 95)}  # espeak-ng pitch 0-99
PEOPLE = {"M": ("a man", "a male speaker", "a male voice"), "F": ("a woman", "a female speaker", "a female voice")}
CAPTION_TEMPLATES = [
    "{person} {saying} {word}{speed}",
    "the word {word} spoken{speed} by {person}",
    "{person} with {accent} accent {says} {word}",
    "a {pitch}{gender} voice {saying} {word}",
    "{word}, spoken{speed} in {accent} accent",
]
VOICE_FIELDS = ("variant", "accent", "wpm", "pitch")  # stored per clip in voice.json
ZEROSHOT_TEMPLATES = ["someone saying {}", "the word {} spoken", "a person says {}"]


def espeak_variants() -> list[tuple[str, str]]:
    """(variant file name, gender M/F) of every espeak-ng voice variant, e.g. ("m1", "M"), ("Alicia", "F")."""
    if shutil.which("espeak-ng") is None:
        raise DataError("espeak-ng is not installed (Debian: apt-get install -y espeak-ng; `make sysdeps` does it)")
    out = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True).stdout
    variants = []
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 5 and parts[4].startswith("!v/"):
            variants.append((parts[4][3:], "F" if parts[2].endswith("/F") else "M"))
    if not variants:
        raise DataError("espeak-ng lists no voice variants (is espeak-ng-data installed?)")
    return variants


class Espeak:
    """libespeak-ng (the library behind the espeak-ng command) through ctypes, synthesising into memory.

    One process-wide engine per worker: ~1 ms of CPU per word instead of ~14 ms for starting the command per clip.
    """

    _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
    SYNCHRONOUS, RATE, PITCH = 2, 1, 3  # espeak_AUDIO_OUTPUT / espeak_PARAMETER values from speak_lib.h

    def __init__(self):
        name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            self.lib = ctypes.CDLL(name)
        except OSError as e:
            raise DataError(f"cannot load libespeak-ng ({e}); install the Debian package espeak-ng") from None
        self.rate = self.lib.espeak_Initialize(self.SYNCHRONOUS, 0, None, 0)
        if self.rate <= 0:
            raise DataError("libespeak-ng failed to initialise (is espeak-ng-data installed?)")
        self.chunks: list[np.ndarray] = []
        self._callback = self._CALLBACK(self._collect)  # kept referenced: the library calls it
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, events) -> int:
        if n > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
        return 0

    def say(self, text: str, voice: str, wpm: int, pitch: int) -> np.ndarray:
        """float32 samples at ``self.rate`` of ``text`` spoken by ``voice`` (e.g. "en-us+f2")."""
        self.chunks = []
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise DataError(f"espeak-ng has no voice {voice!r}")
        self.lib.espeak_SetParameter(self.RATE, wpm, 0)
        self.lib.espeak_SetParameter(self.PITCH, pitch, 0)
        data = text.encode()
        if self.lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 0, None, None) != 0:
            raise DataError(f"espeak-ng failed to speak {text!r} with voice {voice!r}")
        self.lib.espeak_Synchronize()
        return np.concatenate(self.chunks).astype(np.float32) / 32768


_engine: Espeak | None = None


def synthesise(job: dict) -> bytes:
    """One clip, trailing silence trimmed to 50 ms, encoded as FLAC."""
    import soundfile as sf

    global _engine
    if _engine is None:
        _engine = Espeak()
    wave = _engine.say(job["word"], f"{job['accent']}+{job['variant']}", job["wpm"], job["pitch"])
    loud = np.nonzero(np.abs(wave) > 0.01 * np.abs(wave).max())[0]
    wave = wave[: loud[-1] + int(0.05 * _engine.rate)]
    buf = io.BytesIO()
    sf.write(buf, wave, _engine.rate, format="FLAC")
    return buf.getvalue()


def captions(job: dict, rng: random.Random, n: int) -> list[str]:
    whisper = "whisper" in job["variant"].lower()
    speed = f" {job['speed']}" if job["speed"] else ""
    fields = {"person": rng.choice(PEOPLE[job["gender"]]), "word": job["word"], "speed": speed,
              "pitch": job["pitch_word"], "gender": "female" if job["gender"] == "F" else "male",
              "accent": ACCENTS[job["accent"]], "saying": "whispering" if whisper else "saying",
              "says": "whispers" if whisper else "says"}
    distinct = list(dict.fromkeys(t.format(**fields) for t in CAPTION_TEMPLATES))
    return rng.sample(distinct, min(n, len(distinct)))


def make_jobs(words: list[str], voices: list[tuple[str, str]], count: int, rng: random.Random, prefix: str) -> list:
    jobs = []
    for i in range(count):
        variant, gender = rng.choice(voices)
        speed, pitch_word = rng.choice(list(SPEEDS)), rng.choice(list(PITCHES))
        jobs.append({"key": f"{prefix}{i:06d}", "word": words[i % len(words)], "variant": variant, "gender": gender,
                     "accent": rng.choice(list(ACCENTS)), "speed": speed, "wpm": rng.randint(*SPEEDS[speed]),
                     "pitch_word": pitch_word, "pitch": rng.randint(*PITCHES[pitch_word])})
    return jobs


def build(out_dir: Path, train_clips: int = 6000, test_clips: int = 1000, held_out_fraction: float = 0.15,
          captions_per_clip: int = 3, workers: int = 2, seed: int = 0) -> dict:
    """Write ``train``/``test`` shards, ``classes.txt`` (digits) and ``templates.txt``; cached in ``out_dir``."""

    def _build(out_dir: Path) -> dict:
        require("soundfile", "demo", "the spoken words demo data")  # here, not first in the worker processes
        rng = random.Random(seed)
        voices = espeak_variants()
        held = set(rng.sample(range(len(voices)), max(2, round(held_out_fraction * len(voices)))))
        train_voices = [v for i, v in enumerate(voices) if i not in held]
        test_voices = [v for i, v in enumerate(voices) if i in held]
        splits = {"train": make_jobs(DIGITS + COMMANDS, train_voices, train_clips, rng, "train"),
                  "test": make_jobs(DIGITS, test_voices, test_clips, rng, "test")}
        paths = {}
        with Pool(workers) as pool:
            for split, jobs in splits.items():
                clips = pool.imap(synthesise, jobs, chunksize=32)
                samples = ({"__key__": job["key"], "audio.flac": clip, "label.txt": job["word"].encode(),
                            "text.json": json.dumps(captions(job, rng, captions_per_clip)).encode(),
                            "voice.json": json.dumps({k: job[k] for k in VOICE_FIELDS}).encode()}
                           for job, clip in zip(jobs, clips))
                paths[split] = write_samples(samples, out_dir, split, 1000)
        (out_dir / "classes.txt").write_text("\n".join(DIGITS) + "\n")
        (out_dir / "templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
        (out_dir / "held_out_voices.txt").write_text("\n".join(v for v, _ in test_voices) + "\n")
        return {**paths, "classes": str(out_dir / "classes.txt"), "templates": str(out_dir / "templates.txt")}

    version = f"spoken-v2-{train_clips}-{test_clips}-{held_out_fraction}-{captions_per_clip}-{seed}"
    return cached_build(out_dir, version, _build)
