"""Fuzzing: every registered modality's decoder, given arbitrary or mutated bytes, returns an item or raises
``DataError`` (the documented way to reject input), never anything else; so does the sample-level ``Decoder``.

New modality kinds are fuzzed as soon as they are registered: with random bytes, and with mutations of valid files
where ``VALID`` knows how to make some for the kind.
"""
import io
import json
import struct
import zlib

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import shape_png
from mmalign.data.pipeline import Decoder, SkipStats
from mmalign.errors import ConfigError, DataError
from mmalign.modalities import MODALITIES, build_modality

# Derandomized: the same examples on every run keep CI stable; raise max_examples (and drop derandomize) to search.
FUZZ = settings(max_examples=60, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))

# Config fields a kind needs to build its Modality (CPU side only: no tower is loaded).
CONFIG = {"image": {"image_size": 16}, "text": {"model": "not-loaded"}, "timeseries": {"channels": 3}}


def _image_files() -> list[dict[str, bytes]]:
    from PIL import Image

    image = Image.open(io.BytesIO(shape_png(5)))
    out = [{"png": shape_png(5)}]
    for ext, fmt in (("jpg", "JPEG"), ("webp", "WEBP"), ("bmp", "BMP")):
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        out.append({ext: buf.getvalue()})
    return out


def _audio_files() -> list[dict[str, bytes]]:
    tone = np.sin(np.linspace(0, 200 * np.pi, 8000)).astype(np.float32)
    out = []
    for ext, fmt in (("wav", "WAV"), ("flac", "FLAC")):
        buf = io.BytesIO()
        soundfile.write(buf, tone, 16000, format=fmt)
        out.append({ext: buf.getvalue()})
    return out


def _timeseries_files() -> list[dict[str, bytes]]:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).standard_normal((3, 1200)).astype(np.float32))
    return [{"npy": buf.getvalue(), "json": json.dumps({"sampling_rate": 100, "leads": ["I", "II", "V1"]}).encode()}]


# Valid samples per kind (member extension -> bytes; the first member is the modality's, others its metadata).
VALID = {
    "image": _image_files,
    "text": lambda: [{"txt": b"a red square\na square in red\n"}, {"json": b'{"captions": ["a red square", "red"]}'}],
    "audio": _audio_files,
    "timeseries": _timeseries_files,
}


def build(kind: str):
    cls = MODALITIES[kind]
    try:
        return build_modality(kind, cls.config_class(kind=kind, **CONFIG.get(kind, {})))
    except ConfigError as e:
        pytest.fail(f"cannot build modality {kind!r} to fuzz it ({e}); add its required fields to CONFIG")


def mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, a truncated file, a file with a few bytes overwritten, or a file with junk inserted."""
    n = max(1, len(valid))
    overwrite = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=8)
    return st.one_of(
        st.binary(max_size=1024),
        st.integers(0, len(valid)).map(lambda k: valid[:k]),
        overwrite.map(lambda edits: _overwrite(valid, edits)),
        st.tuples(st.integers(0, len(valid)), st.binary(min_size=1, max_size=64)).map(
            lambda t: valid[: t[0]] + t[1] + valid[t[0]:]),
    )


def _overwrite(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for i, value in edits:
        if i < len(out):
            out[i] = value
    return bytes(out)


def _decode(modality, kind: str, members: dict[str, bytes], ext: str, train: bool) -> None:
    sample = {f"{kind}.{e}": data for e, data in members.items()}
    modality.transform(modality.decode_member(sample, f"{kind}.{ext}"), train)


@pytest.mark.parametrize("kind", sorted(MODALITIES))
def test_decoder_returns_an_item_or_a_data_error(kind):
    modality = build(kind)
    samples = VALID[kind]() if kind in VALID else [{ext: b""} for ext in modality.extensions]

    @FUZZ
    @given(st.data())
    def check(data):
        members = dict(data.draw(st.sampled_from(samples)))
        ext = next(iter(members))
        broken = data.draw(st.sampled_from(sorted(members)))  # the modality's member or its metadata
        members[broken] = data.draw(mutations(members[broken]))
        if broken == ext:  # and under another extension of the kind
            new_ext = data.draw(st.sampled_from(modality.extensions))
            members = {new_ext if e == ext else e: v for e, v in members.items()}
            ext = new_ext
        for train in (True, False):
            try:
                _decode(modality, kind, members, ext, train)
            except DataError:
                pass

    for members in samples:  # the valid samples themselves decode
        if any(members.values()):
            _decode(modality, kind, members, next(iter(members)), False)
    check()


def test_sample_decoder_yields_or_counts_every_sample():
    modalities = {kind: build(kind) for kind in ("image", "text")}
    members = {"image.png": shape_png(1), "image.xyz": shape_png(2), "png": shape_png(3), "text.txt": b"a caption",
               "text.json": b'["one", "two"]', "txt": b"bare", "label.txt": b"square", "cls": b"\xff"}

    @FUZZ
    @given(st.lists(st.dictionaries(st.sampled_from(sorted(members)),
                                    st.sampled_from(sorted(members)).flatmap(lambda m: mutations(members[m])),
                                    max_size=5), max_size=6))
    def check(samples):
        stats = SkipStats()
        raw = [{"__key__": f"k{i}", "__url__": "fuzz.tar", **s} for i, s in enumerate(samples)]
        decoded = list(Decoder(modalities, train=True, stats=stats)(iter(raw)))
        assert len(decoded) + sum(stats.counts.values()) == len(raw)

    check()


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def test_hostile_inputs_are_refused_cheaply():
    from PIL import Image

    image = build("image")
    with pytest.raises(DataError, match="cannot decode image"):  # decompression bomb: refused from the header
        image.decode(_png_header_only(60_000, 60_000), "png")
    buf = io.BytesIO()
    Image.new("RGB", (400_000, 1)).save(buf, format="PNG")
    with pytest.raises(DataError, match="too elongated"):  # 16 x 6.4M pixels once resized
        image.decode(buf.getvalue(), "png")
    text = build("text")
    for blob in (b"[" * 100_000, b"1" * 10_000, json.dumps({"captions": [1, 2]}).encode()):
        with pytest.raises(DataError, match="text json"):
            text.decode(blob, "json")
    audio = build("audio")
    for rate in (44_101, 7):  # a co-prime rate would need a resampling filter of gigabytes; 7 Hz, minutes of audio
        buf = io.BytesIO()
        soundfile.write(buf, np.ones(800, dtype=np.float32), rate, format="WAV")
        with pytest.raises(DataError, match=f"at {rate} Hz cannot be resampled"):
            audio.decode(buf.getvalue(), "wav")
    timeseries = build("timeseries")
    (members,) = _timeseries_files()
    with pytest.raises(DataError, match="cannot read npy"):  # numpy's header parser raises TokenError on this one
        _decode(timeseries, "timeseries", {**members, "npy": _overwrite(members["npy"], [(8, 1)])}, "npy", True)
    with pytest.raises(DataError, match=r"cannot resample 1e-06 Hz to 100 Hz \(more than a factor 1000\)"):
        _decode(timeseries, "timeseries", {**members, "json": b'{"sampling_rate": 1e-6}'}, "npy", True)
