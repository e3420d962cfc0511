"""mrloss: multi-region weighted SFT with a fused, zero-weight-skipping linear cross-entropy.

Public names only, imported on first use (PEP 562 ``__getattr__``): ``import mrloss`` and the ``mrloss`` command's
start (``mrloss --help``, ``--version``) do not import torch; heavy or optional imports (transformers, verl,
matplotlib, ...) happen inside the functions that need them.
"""

import importlib

__version__ = "0.1.0"
# public name -> the module that defines it
_PUBLIC = {
    "linear_cross_entropy": "mrloss.ops.api",
    "LinearCrossEntropyLoss": "mrloss.ops.api",
    "LossOptions": "mrloss.ops.options",
    "LossOutput": "mrloss.ops.output",
    "TokenMetrics": "mrloss.ops.api",
    "IGNORE_INDEX": "mrloss.ops.options",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mrloss' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
