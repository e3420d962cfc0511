"""The PyTorch row op alone, with and without the token metrics: ``python -m bench.row_op``.

    python -m bench.row_op [--code DIR ...] [--rows 1024] [--vocab 32000] [--repeats 9] [--out FILE.md]

Times ``mrloss.ops.backends.torch.cross_entropy_rows`` on ``[rows, vocab]`` logits (float32 and bfloat16; with and
without ``grad_scales``; with and without the token metrics, accuracy and entropy) on 1 thread, a fresh copy of the
same logits before each call (not timed), the cases in turn, best of ``--repeats``. ``--code DIR`` times another
checkout's row op in its own process (e.g. the code before a change: ``git archive REV mrloss | tar -x -C DIR``);
every checkout runs twice, alternating, and keeps its best.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = [
    (dtype, grad, metrics) for dtype in ("float32", "bfloat16") for grad in (False, True) for metrics in (False, True)
]


def _worker(rows: int, vocab: int, repeats: int) -> dict[str, float]:
    """{case name: best milliseconds of one call of the row op}."""
    import time

    import torch

    from mrloss.ops.backends.torch import cross_entropy_rows

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=gen) * 4
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    scales = torch.rand(rows, generator=gen)
    best = {}
    for _ in range(repeats):
        for dtype, grad, metrics in CASES:
            source = logits.to(getattr(torch, dtype))
            scratch = source.clone()
            outputs = {name: torch.empty(rows) for name in ("lse_out", "correct_out", "entropy_out")}
            if not metrics:
                outputs.update(correct_out=None, entropy_out=None)
            start = time.perf_counter()
            cross_entropy_rows(scratch, targets, scales if grad else None, softcap=None, label_smoothing=0.0, **outputs)
            milliseconds = (time.perf_counter() - start) * 1e3
            name = case_name(dtype, grad, metrics)
            best[name] = min(best.get(name, milliseconds), milliseconds)
    return best


def case_name(dtype: str, grad: bool, metrics: bool) -> str:
    """The table's name of a case of CASES."""
    return f"{dtype}, {'with' if grad else 'no'} grad_scales, {'with' if metrics else 'no'} metrics"


def measure(code: Path, options) -> dict[str, float]:
    """_worker's result in a fresh process whose ``mrloss`` is the one under ``code``."""
    args = f"{options.rows}, {options.vocab}, {options.repeats}"
    call = f"import sys, json; sys.path.insert(0, {str(code)!r}); from bench.row_op import _worker; "
    call += f"print(json.dumps(_worker({args})))"
    done = subprocess.run([sys.executable, "-c", call], cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"row op ({code}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, action="append", default=[], help="another checkout to time too")
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=9, help="calls per case and process (the best is kept)")
    parser.add_argument("--out", type=Path, help="write the table (Markdown) here")
    options = parser.parse_args(argv)
    codes = {"this checkout": REPO, **{str(code): code for code in options.code}}
    best = {label: {} for label in codes}
    for _ in range(2):
        for label, code in codes.items():
            for name, milliseconds in measure(code, options).items():
                best[label][name] = min(best[label].get(name, milliseconds), milliseconds)
    lines = [
        f"PyTorch row op alone, [{options.rows}, {options.vocab}] logits, 1 thread, best of {2 * options.repeats} "
        "calls (ms)",
        "",
        "| case | " + " | ".join(codes) + " |",
        "|---" * (len(codes) + 1) + "|",
    ]
    for case in CASES:
        name = case_name(*case)
        lines.append(f"| {name} | " + " | ".join(f"{best[label][name]:.3g}" for label in codes) + " |")
    print("\n".join(lines))
    if options.out:
        options.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
