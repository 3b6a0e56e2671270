"""A part whose optional dependencies are missing fails with one line naming the extra that installs them (the
wheel test checks the same in an environment that really lacks them)."""
import sys

import pytest

from mmalign.config import from_dict
from mmalign.errors import MMAlignError
from mmalign.modalities import build_modality
from mmalign.modality_config import AudioConfig, TimeseriesConfig
from mmalign.optional import require


@pytest.mark.parametrize("module, kind, cfg, extra", [
    ("soundfile", "audio", AudioConfig, "audio"),
    ("torchaudio", "audio", AudioConfig, "audio"),
    ("scipy", "timeseries", TimeseriesConfig, "timeseries"),
])
def test_a_modality_without_its_extra_names_the_extra(monkeypatch, module, kind, cfg, extra):
    monkeypatch.setitem(sys.modules, module, None)  # what `import module` sees when it is not installed
    monkeypatch.delitem(sys.modules, f"{module}.signal", raising=False)
    with pytest.raises(MMAlignError) as e:
        build_modality("speech", from_dict(cfg, {"kind": kind}))
    assert str(e.value) == (f"{kind.replace('timeseries', 'time series')} modality 'speech' needs {module}, which is "
                            f"not installed: pip install 'mmalign[{extra}]'")


def test_an_installed_module_that_fails_to_import_is_named_too(tmp_path, monkeypatch):
    (tmp_path / "needs_missing.py").write_text("import not_installed_anywhere\n")
    (tmp_path / "broken_extension.py").write_text("raise OSError('libtorchaudio.so: undefined symbol: _ZN3c10')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MMAlignError, match=r"^x needs needs_missing, which is installed but fails to import \(No "
                                           r"module named 'not_installed_anywhere'\); reinstall it .*'mmalign\[audio\]'"):
        require("needs_missing", "audio", "x")
    with pytest.raises(MMAlignError, match=r"^x needs broken_extension, which is installed but fails to import "
                                           r"\(libtorchaudio.so: undefined symbol: _ZN3c10\); .*'mmalign\[audio\]'$"):
        require("broken_extension", "audio", "x")
    assert require("json", "audio", "x") is sys.modules["json"]


def test_demo_data_without_the_demo_extra_names_it(monkeypatch, tmp_path):
    from mmalign.demo_data import digits

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.delitem(sys.modules, "sklearn.datasets", raising=False)
    with pytest.raises(MMAlignError, match=r"^the digits demo data needs sklearn, which is not installed: "
                                           r"pip install 'mmalign\[demo\]'$"):
        digits.build(tmp_path)
