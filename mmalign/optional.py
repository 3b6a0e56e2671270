"""Optional dependencies: the modules an extra of ``pip install 'mmalign[EXTRA]'`` provides, imported where a part
needs them, so that a missing one is one line naming the extra instead of a traceback."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MMAlignError


def require(module: str, extra: str, user: str) -> ModuleType:
    """Import ``module`` for ``user`` (what needs it, e.g. "audio modality 'speech'"); raise ``MMAlignError`` naming
    ``extra`` when it is missing, or installed but failing to import (e.g. a torchaudio built for another torch)."""
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if (e.name or package).split(".")[0] == package:
            raise MMAlignError(f"{user} needs {package}, which is not installed: pip install 'mmalign[{extra}]'") \
                from None
        problem: Exception = e  # the module is there, something it imports is not
    except (OSError, RuntimeError) as e:  # a compiled extension built against another release
        problem = e
    first = str(problem).splitlines()[0] if str(problem) else type(problem).__name__
    raise MMAlignError(f"{user} needs {package}, which is installed but fails to import ({first}); reinstall it "
                       f"(a release that matches your torch): pip install 'mmalign[{extra}]'")
