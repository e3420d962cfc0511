"""The Triton compile check's results on several Triton versions as one markdown table.

Each input is the ``--json`` output of ``python -m mrloss.ops.backends.triton.compile_check`` run under one
Triton version (a CPU compile: Triton's real compiler for sm_80 and sm_90, no GPU). One row per kernel
configuration; one column per (target, Triton version) holding registers / spill-store bytes / shared-memory
bytes, ``error`` for a compile error, and a ``!`` after a cell the check calls unfit. The commands that
regenerate ``bench/results/cpu-compile-check.md`` are ``REGENERATE`` (printed at the top of the file too).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from mrloss.ops.backends.triton.compile_check import SPILLS_ALLOWED

REGENERATE = """\
# the GPU image's triton (3.6.0) in a venv of its own (torch 2.13.0: the CPU wheel), the newest in the project's;
# TRITON_INTERPRET unset, from the repository root
python3 -m venv /tmp/triton36 && /tmp/triton36/bin/pip install torch==2.13.0 triton==3.6.0
PYTHONPATH=. /tmp/triton36/bin/python -m mrloss.ops.backends.triton.compile_check --jobs 2 --json /tmp/compile-3.6.json
python -m mrloss.ops.backends.triton.compile_check --jobs 2 --json /tmp/compile-newest.json
python -m bench.compile_table /tmp/compile-3.6.json /tmp/compile-newest.json > bench/results/cpu-compile-check.md
"""


def _cell(record: dict) -> str:
    if record["error"] is not None:
        return "error !"
    cell = f"{record['registers']} / {record['spill_bytes']} / {record['shared_bytes']}"
    return cell + (" !" if record["problems"] else "")


def _arch(record: dict) -> str:
    return "sm_{}{}".format(*record["capability"])


def table(runs: list[list[dict]]) -> str:
    """Markdown: the header, one row per configuration (in the first run's order), the problems listed below."""
    columns = sorted({(_arch(record), record["triton"]) for run in runs for record in run})
    cells: dict[str, dict] = {}
    for run in runs:
        for record in run:
            configuration = record["id"].split("-", 1)[1]  # the id without its "sm_XX-" prefix
            cells.setdefault(configuration, {"record": record})[(_arch(record), record["triton"])] = record
    header = "| kernel | dtype | config | ints % 16 | " + " | ".join(f"{arch} triton {v}" for arch, v in columns)
    lines = [header + " |", "|---" * (4 + len(columns)) + "|"]
    for row in cells.values():
        first = row["record"]
        ints = "yes" if first["ints16"] else "no"
        values = " | ".join(_cell(row[column]) if column in row else "" for column in columns)
        lines.append(f"| {first['kernel']} | {first['dtype']} | {first['config']} | {ints} | {values} |")
    problems = [
        f"- {_arch(record)} triton {record['triton']}: {record['id']}: {'; '.join(record['problems'])}"
        for run in runs
        for record in run
        if record["problems"]
    ]
    lines += ["", f"Unfit configurations: {len(problems)}", *problems]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="compile_check --json outputs, one per triton version")
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.results]
    versions = ", ".join(sorted({record["triton"] for run in runs for record in run}))
    print(
        f"# Triton compile check (CPU compile: no GPU was used)\n\n"
        f"Triton's real compiler for sm_80 and sm_90 on `{platform.machine()}` ({platform.system()}), triton "
        f"{versions}. Each cell: registers / spill-store bytes / shared-memory bytes per block; `!`: unfit "
        f"(`mrloss.ops.backends.triton.compile_check`). Regenerate with:\n\n```\n{REGENERATE}```\n"
    )
    print(table(runs), end="")
    print("\nSpills allowed (`compile_check.SPILLS_ALLOWED`):")
    for (kernel, dtype), reason in SPILLS_ALLOWED.items():
        print(f"- {kernel} {dtype}: {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
