"""The names users rely on: the stable Python API, the README's Python API block and the console script."""
import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_stable_api_names_import():
    from mmalign.eval import retrieval_metrics, zeroshot_accuracy, zeroshot_classifier
    from mmalign.losses import (caption_loss, chunked_clip_loss, clip_loss, cwcl_loss, cwcl_weights, gram_loss,
                                gram_volume, siglip_loss, symile_loss)
    from mmalign.model import AlignmentModel

    assert all(callable(f) for f in (retrieval_metrics, zeroshot_accuracy, zeroshot_classifier, caption_loss,
                                     chunked_clip_loss, clip_loss, cwcl_loss, cwcl_weights, gram_loss, gram_volume,
                                     siglip_loss, symile_loss))
    assert callable(AlignmentModel.from_pretrained) and callable(AlignmentModel.save_pretrained)


def test_readme_python_api_imports_and_console_script():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    imports = re.findall(r"^from (mmalign[\w.]*) import (.+)$", block, re.M)
    assert len(imports) >= 3
    for module, names in imports:
        missing = [n.strip() for n in names.split(",") if not hasattr(importlib.import_module(module), n.strip())]
        assert not missing, f"README imports {missing} from {module}"
    assert '[project.scripts]\nmmalign = "mmalign.cli:main"\n' in (REPO / "pyproject.toml").read_text()
