"""mrloss: multi-region weighted SFT with a fused, zero-weight-skipping linear cross-entropy.

Public names only; heavy or optional imports (transformers, verl, matplotlib, ...) happen inside the
functions that need them, so ``import mrloss`` stays light.
"""

from mrloss.ops.api import LinearCrossEntropyLoss, TokenMetrics, linear_cross_entropy
from mrloss.ops.options import IGNORE_INDEX, LossOptions
from mrloss.ops.output import LossOutput

__version__ = "0.1.0"
__all__ = [
    "linear_cross_entropy",
    "LinearCrossEntropyLoss",
    "LossOptions",
    "LossOutput",
    "TokenMetrics",
    "IGNORE_INDEX",
    "__version__",
]
