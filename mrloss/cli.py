"""`mrloss` command line: one entry point, subcommands implemented next to the code they drive.

mrloss demo                      write example data, show a loss mask, train a tiny model on CPU
mrloss train --config F|NAME [--trainer hf|trl] [k=v ...]
mrloss configs [NAME]            list the built-in configs, or print one
mrloss prepare ...               validate / convert / split raw data
mrloss show FILE [--index N] [--html out.html]
mrloss plot RUN_DIR
mrloss --version

A mistake a user can make (a bad config or sample, a missing or unwritable file) ends in one line on stderr,
``mrloss <command>: <message>`` with its control characters escaped, and exit code 2 (config / data) or 1
(files); a bug still shows its traceback.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line help); each function takes argv (list[str]) and returns an exit code.
SUBCOMMANDS = {
    "demo": ("mrloss.training.demo", "main", "write example data, show a loss mask, train a tiny model on CPU"),
    "train": ("mrloss.training.run", "main", "train from a YAML config: mrloss train --config F [key=value ...]"),
    "configs": ("mrloss.configs", "main", "list the built-in configs (mrloss configs NAME prints one)"),
    "prepare": ("mrloss.data.prepare", "main", "validate, convert and split a raw data file"),
    "show": ("mrloss.debug.show", "main", "show the loss mask of one sample (terminal or HTML)"),
    "plot": ("mrloss.debug.plot", "main", "plot per-region loss curves of a run directory"),
}


def _usage() -> str:
    lines = ["usage: mrloss <command> [options]   (mrloss --version: the installed version)", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from mrloss import __version__

        print(f"mrloss {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"mrloss: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, function, _ = SUBCOMMANDS[name]
    try:
        return int(getattr(importlib.import_module(module), function)(rest) or 0)
    except KeyboardInterrupt:
        print(f"mrloss {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        code = _user_error_code(error)
        if code is None:
            raise
        from mrloss.formats.terminal import escape_control

        print(f"mrloss {name}: {escape_control(str(error))}", file=sys.stderr)
        return code


def _user_error_code(error: Exception) -> int | None:
    """Exit code of an error a user caused: 2 for a config or data problem (`ConfigError`, `FormatError`), 1 for a
    file problem (OSError: missing, unreadable, unwritable, disk full); None for anything else (a bug)."""
    from mrloss.formats import FormatError
    from mrloss.training.config import ConfigError

    if isinstance(error, (ConfigError, FormatError)):
        return 2
    if isinstance(error, OSError):
        return 1
    return None


if __name__ == "__main__":
    sys.exit(main())
