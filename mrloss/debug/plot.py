"""`mrloss plot RUN_DIR [--out PNG]`: per-region loss curves (and gradient shares, multipliers) of a run."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from mrloss.debug.monitor import STATS_FILE
from mrloss.debug.visualizer import OUTSIDE


def find_stats_file(run_dir) -> Path:
    """``run_dir`` itself if it is a file, else ``run_dir/region_stats.jsonl``, else the first one below it."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    if (run_dir / STATS_FILE).is_file():
        return run_dir / STATS_FILE
    found = sorted(run_dir.rglob(STATS_FILE))
    if not found:
        raise FileNotFoundError(f"no {STATS_FILE} in {run_dir} (written by MultiRegionTrainingMonitor)")
    return found[0]


def read_stats(path) -> list[dict]:
    """The records of a stats file. A last line cut short (a run killed while writing it, or still writing) is
    skipped with a warning; any other line that is not a JSON object is a ValueError naming the file and line."""
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # no newline after it: the torn end of the file
                warnings.warn(f"{path}:{number}: skipped a last line cut short ({error.msg})", stacklevel=2)
                continue
            raise ValueError(f"{path}:{number}: not a JSON record ({error.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def per_step_series(path) -> dict:
    """Per-step series of a stats file: micro-batches of one step merged (mean losses weighted by learned
    tokens, gradient shares averaged, the step's last multipliers).

    Returns ``{"steps": [...], "mean_loss": {type: [...]}, "weighted_loss": [...], "grad_share": {type: [...]},
    "multipliers": {type: [...]}}``; a missing value is NaN.
    """
    by_step: dict[int, list[dict]] = {}
    for record in read_stats(path):
        if "regions" in record:
            by_step.setdefault(record["step"], []).append(record)
    steps = sorted(by_step)
    types = list(dict.fromkeys(name for records in by_step.values() for r in records for name in r["regions"]))
    multiplier_types = list(
        dict.fromkeys(name for records in by_step.values() for r in records for name in r.get("multipliers", {}))
    )
    nan = float("nan")

    def mean_loss(records, name):
        pairs = [
            (r["regions"][name].get("mean_loss"), r["regions"][name]["learned_tokens"])
            for r in records
            if name in r["regions"]
        ]
        pairs = [(loss, n) for loss, n in pairs if loss is not None and n > 0]
        return sum(loss * n for loss, n in pairs) / sum(n for _, n in pairs) if pairs else nan

    def average(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else nan

    return {
        "steps": steps,
        "mean_loss": {name: [mean_loss(by_step[s], name) for s in steps] for name in types},
        "weighted_loss": [average([r["total"].get("weighted_loss") for r in by_step[s]]) for s in steps],
        "grad_share": {
            name: [average([r["regions"].get(name, {}).get("grad_share") for r in by_step[s]]) for s in steps]
            for name in types
        },
        "multipliers": {
            name: [
                next((r["multipliers"][name] for r in reversed(by_step[s]) if name in r.get("multipliers", {})), nan)
                for s in steps
            ]
            for name in multiplier_types
        },
    }


def plot_run(run_dir, out=None) -> Path:
    """Draw the per-region curves of a run to a PNG (default: next to the stats file); returns its path."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = find_stats_file(run_dir)
    series = per_step_series(path)
    if not series["steps"]:
        raise ValueError(f"{path} holds no batch statistics")
    out = Path(out) if out is not None else path.parent / "per_region_loss.png"
    panels = 3 if series["multipliers"] else 2
    figure, axes = plt.subplots(panels, 1, figsize=(9, 3.2 * panels), sharex=True, squeeze=False)
    axes = axes[:, 0]
    steps = series["steps"]
    colours = {name: f"C{i}" for i, name in enumerate(series["mean_loss"])}
    marker = "o" if len(steps) <= 30 else None

    def style(name):
        return {
            "label": name,
            "color": colours.get(name),
            "marker": marker,
            "markersize": 3,
            "linestyle": ":" if name == OUTSIDE else "-",
        }

    for name, values in series["mean_loss"].items():
        axes[0].plot(steps, values, **style(name))
    axes[0].plot(steps, series["weighted_loss"], label="weighted loss (all)", color="black", linestyle="--")
    axes[0].set_ylabel("mean token loss (nats)")
    axes[0].set_title(f"per-region loss: {path.parent}")
    for name, values in series["grad_share"].items():
        axes[1].plot(steps, values, **style(name))
    axes[1].set_ylabel("share of Σ w·l")
    axes[1].set_ylim(-0.02, 1.02)
    for name, values in series["multipliers"].items():
        axes[2].plot(steps, values, **style(name))
    if panels == 3:
        axes[2].set_ylabel("weight multiplier")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("optimizer step")
    axes[-1].set_xlim(steps[0] - 0.5, steps[-1] + 0.5)  # the logged steps (from 1), not from 0
    axes[-1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mrloss plot", description="Plot per-region loss curves of a run.")
    parser.add_argument("run_dir", help=f"run directory holding {STATS_FILE} (or the file itself)")
    parser.add_argument("--out", help="PNG to write (default: per_region_loss.png next to the stats file)")
    args = parser.parse_args(argv)
    try:
        out = plot_run(args.run_dir, args.out)
    except FileNotFoundError as error:
        print(f"mrloss plot: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # the file's content
        print(f"mrloss plot: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
