"""What the GPU pass needs that the GPU machine's image lacks: ``python -m bench.wheel_list [--check-imports]``.

The pass (bench/gpu_pass.sh) imports `PASS_IMPORTS`; the distributions behind them are `ROOTS`. The image's
packages are listed in bench/image_packages.txt (names, and versions where known). The carried set is the
dependency closure of `ROOTS` (requirements of the versions installed *here*, markers evaluated for the image's
Python 3.12 on Linux, no extras), stopping at every package the image has: the image keeps its own torch,
triton, transformers, accelerate, numpy, pyarrow, ... Printed as ``name==version`` (bench/make_wheels.sh downloads
their wheels; the pass installs them with ``pip install --no-index --no-deps --target`` and puts that folder on
PYTHONPATH). A carried package whose requirement excludes an image package's known version is reported on stderr
and makes the exit status 1.

``--from-image`` prints the image's packages the pass needs (its roots on the image, and every requirement of the
carried set that the image holds), pinned where the image's version is known: what bench/rehearse_gpu_pass.sh
installs to stand in for the image. ``--check-imports`` (run by the pass after the install, and by
bench/rehearse_gpu_pass.sh) imports every module of `PASS_IMPORTS`, prints its version and location, and exits 1
naming each one that does not import.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

IMAGE_PACKAGES = Path(__file__).resolve().parent / "image_packages.txt"
IMAGE_PYTHON = "3.12"
# module imported by the pass -> its distribution. mrloss itself comes from the tree (PYTHONPATH).
PASS_IMPORTS = {
    "torch": "torch",
    "triton": "triton",
    "transformers": "transformers",  # mrloss's base requirements
    "accelerate": "accelerate",
    "datasets": "datasets",
    "tokenizers": "tokenizers",
    "numpy": "numpy",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "pytest": "pytest",  # the GPU tests
    "pytest_benchmark": "pytest-benchmark",
    "hypothesis": "hypothesis",
    "pyarrow": "pyarrow",
    "peft": "peft",
    "matplotlib": "matplotlib",  # the bench report
    "pandas": "pandas",
    "liger_kernel": "liger-kernel",  # the baselines
    "cut_cross_entropy": "cut-cross-entropy",
    "trl": "trl",
    "mrloss.integrations.hf": None,  # mrloss from the tree, through the modules the pass runs
    "mrloss.integrations.trl": None,
    "bench.linear_ce": None,
}
ROOTS = tuple(sorted({dist for dist in PASS_IMPORTS.values() if dist is not None}))


def image_packages(path: Path = IMAGE_PACKAGES) -> dict[str, Version | None]:
    """{canonical name: version or None (not recorded)} of the image's packages."""
    packages = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[canonicalize_name(name)] = Version(version) if version else None
    return packages


def _marker_environment(python_version: str) -> dict[str, str]:
    return {
        "extra": "",
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }


class Closure(NamedTuple):
    carried: dict[str, str]  # canonical name -> version installed here: the wheels that travel
    from_image: list[str]  # the image's packages the pass needs: roots, and requirements of the carried set
    conflicts: list[str]  # a carried package's requirement that excludes an image package's known version


def closure(roots=ROOTS, image: dict[str, Version | None] | None = None, python_version: str = IMAGE_PYTHON) -> Closure:
    """The carried set of ``roots`` against ``image`` (markers evaluated for ``python_version`` on Linux)."""
    image = image_packages() if image is None else image
    environment = _marker_environment(python_version)
    carried: dict[str, str] = {}
    from_image: set[str] = set()
    conflicts: list[str] = []
    pending = [canonicalize_name(root) for root in roots]
    while pending:
        name = pending.pop()
        if name in image:
            from_image.add(name)
            continue
        if name in carried:
            continue
        distribution = metadata.distribution(name)
        carried[name] = distribution.version
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            needed = canonicalize_name(requirement.name)
            known = image.get(needed)
            if needed in image and known is not None and not requirement.specifier.contains(known, prereleases=True):
                conflicts.append(f"{name} {distribution.version} requires {requirement}; the image has {known}")
            pending.append(needed)
    return Closure(dict(sorted(carried.items())), sorted(from_image), conflicts)


def check_imports() -> list[str]:
    """Import every module of `PASS_IMPORTS`; print version and location; return those that failed, with why."""
    failed = []
    for module, distribution in PASS_IMPORTS.items():
        try:
            imported = importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 (any import failure is a missing or broken package)
            failed.append(f"{module}: {type(error).__name__}: {error}")
            continue
        version = metadata.version(distribution) if distribution else "(tree)"
        print(f"import {module:28s} {version:14s} {getattr(imported, '__file__', '?')}")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-imports", action="store_true", help="import what the pass imports; 1 if any fails")
    parser.add_argument("--python-version", default=IMAGE_PYTHON, help="evaluate markers for this Python")
    parser.add_argument(
        "--from-image",
        action="store_true",
        help="print the image's packages the pass needs instead (NAME or NAME==VERSION where the image's is known)",
    )
    options = parser.parse_args(argv)
    if options.check_imports:
        failed = check_imports()
        for line in failed:
            print(f"MISSING {line}", file=sys.stderr)
        return 1 if failed else 0
    carried, from_image, conflicts = closure(python_version=options.python_version)
    if options.from_image:
        image = image_packages()
        print("\n".join(name if image[name] is None else f"{name}=={image[name]}" for name in from_image))
    else:
        print("\n".join(f"{name}=={version}" for name, version in carried.items()))
    for conflict in conflicts:
        print(f"conflict: {conflict}", file=sys.stderr)
    return 1 if conflicts else 0


if __name__ == "__main__":
    sys.exit(main())
