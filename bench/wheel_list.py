"""``python -m bench.wheel_list``: ``name==version`` of every installed package the GPU pass needs besides
torch and triton (bench/gpu_pass.sh), the dependency closure of `ROOTS` at the versions installed here.

bench/make_wheels.sh downloads their wheels; the GPU machine installs them with ``--no-index --no-deps``.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# mrloss's own requirements, the Trainer's (accelerate), the bench report's, and the baselines
ROOTS = (
    "transformers",
    "tokenizers",
    "accelerate",
    "numpy",
    "pyyaml",
    "tqdm",
    "pytest",
    "pytest-benchmark",
    "matplotlib",
    "pandas",
    "liger-kernel",
    "cut-cross-entropy",
    "trl",
)
# already on the GPU machine (with torch)
PROVIDED = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")


def closure(roots=ROOTS) -> dict[str, str]:
    """{canonical name: installed version} of ``roots`` and of everything they require (markers evaluated
    for this interpreter, no extras), except `PROVIDED`."""
    found: dict[str, str] = {}
    pending = [canonicalize_name(root) for root in roots]
    while pending:
        name = pending.pop()
        if name in found or PROVIDED.match(name):
            continue
        distribution = metadata.distribution(name)
        found[name] = distribution.version
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(canonicalize_name(requirement.name))
    return found


def main() -> int:
    print("\n".join(f"{name}=={version}" for name, version in sorted(closure().items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
