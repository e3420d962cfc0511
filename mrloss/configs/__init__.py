"""The built-in training configs (``multi_region_<name>.yaml`` beside this file, shipped in the wheel).

``mrloss train --config tag_based`` (a built-in name, with or without the ``multi_region_`` prefix and the
``.yaml`` suffix) or ``--config path.yaml``; `resolve_config` decides which, ``mrloss configs [NAME]`` lists
them or prints one. Their relative data paths resolve in the run's working directory, and they write the
shipped example data set there (``data.write_examples: true``), so they train from any directory.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

PREFIX = "multi_region_"


def builtin_configs() -> dict[str, Path]:
    """Built-in name (``tag_based``) -> its YAML file, sorted by name."""
    files = [f for f in resources.files(__name__).iterdir() if f.name.startswith(PREFIX) and f.name.endswith(".yaml")]
    return {f.name[len(PREFIX) : -len(".yaml")]: Path(str(f)) for f in sorted(files, key=lambda f: f.name)}


def builtin_name(name: str) -> str | None:
    """``tag_based`` / ``multi_region_tag_based`` / ``multi_region_tag_based.yaml`` -> ``tag_based``; None when
    ``name`` names no built-in config."""
    stem = name.removesuffix(".yaml").removeprefix(PREFIX)
    return stem if stem in builtin_configs() else None


def resolve_config(name_or_path: str | Path) -> Path:
    """An existing file is used as given; otherwise a built-in name gives its file; otherwise the path as given
    (the caller reports it missing, with the built-in names)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    name = builtin_name(str(name_or_path))
    return builtin_configs()[name] if name is not None and path.parent == Path(".") else path


def main(argv: list[str] | None = None) -> int:
    """``mrloss configs``: the built-in names and files; ``mrloss configs NAME``: that config's YAML."""
    parser = argparse.ArgumentParser(prog="mrloss configs", description="List or print the built-in configs.")
    parser.add_argument("name", nargs="?", help="print this built-in config (e.g. tag_based)")
    args = parser.parse_args(argv)
    configs = builtin_configs()
    if args.name is None:
        width = max(len(name) for name in configs)
        for name, path in configs.items():
            print(f"{name:<{width}}  {path}")
        print("\nmrloss train --config NAME [key.sub=value ...]   (or --config path/to/your.yaml)")
        return 0
    name = builtin_name(args.name)
    if name is None:
        print(f"mrloss configs: no built-in config {args.name!r}; built-in: {', '.join(configs)}", file=sys.stderr)
        return 2
    sys.stdout.write(configs[name].read_text(encoding="utf-8"))
    return 0
