"""Write a benchmark run: JSON (everything), CSV (one row per case x implementation), Markdown (ratio
tables + all measurements) and PNG (forward+backward time and peak extra memory vs N).

``python -m bench.report RUN.json`` rewrites the CSV, Markdown and PNG from a run's JSON.
Ratios are mrloss / baseline: below 1 means mrloss is faster (time) or smaller (memory).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

SCHEMA = "mrloss-bench/1"
METHOD = {
    "timing": "per step: forward (the loss) and backward (loss.backward()) timed apart, from fresh gradients; "
    "CUDA events on a GPU, time.perf_counter on a CPU; median over the timed steps after the "
    "warmup steps; fwd_bwd_ms is the median of the per-step sums",
    "memory": "peak extra = peak during one forward+backward - memory before it - the gradients of hidden "
    "and weight. GPU: torch.cuda.max_memory_allocated. CPU: VmHWM (reset through "
    "/proc/self/clear_refs) - VmRSS, in a process of its own per (implementation, case), with "
    "MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the RSS at once",
    "errors": "relative to a reference computed from the same inputs by mrloss.reference in reference_dtype "
    "(float64; float32 on a CPU for large cases): |loss - ref| / |ref|, and ||g - g_ref|| / ||g_ref|| "
    "for the gradients of hidden and weight",
    "ceiling": "rate of the fastest of several square matmuls in the bench dtype (median rate also "
    "recorded); ceiling_fraction = 6 * N_learned * H * V / fwd_bwd time / ceiling rate",
    "token_weights": "sequences of seq_len tokens: a zero-weight prompt of round(zero_frac * seq_len) tokens, "
    "then three response regions of weights 1.0, 0.5, 2.0; targets are -100 on weight 0",
}
CSV_FIELDS = [
    "case",
    "impl",
    "status",
    "forward_ms",
    "backward_ms",
    "fwd_bwd_ms",
    "peak_extra_mib",
    "achieved_tflops",
    "ceiling_fraction",
    "loss",
    "loss_rel_err",
    "grad_hidden_rel_err",
    "grad_weight_rel_err",
    "reference_dtype",
    "num_threads",
    "reps",
    "reason",
]
TIMED = "ok"
# below this the peak extra memory of a baseline is noise: no memory ratio against it
MIN_MEMORY_MIB = 1.0


def one_line(result: dict) -> str:
    """Short progress line of one result."""
    if result.get("status") == "ok" and "fwd_bwd_ms" in result:
        return (
            f"fwd+bwd {result['fwd_bwd_ms']:.2f} ms, peak extra {result['peak_extra_mib']:.1f} MiB, "
            f"grad_W err {result['grad_weight_rel_err']:.1e}"
        )
    if result.get("status") == "ok" and "tflops" in result:
        return (
            f"{result['tflops']:.3f} TFLOP/s best, {result['median_tflops']:.3f} median "
            f"({result['dtype']}, {result['shape'][0]}^3)"
        )
    if result.get("status") == "verified":
        return f"verified: loss err {result['loss_rel_err']:.1e}, grad_W err {result['grad_weight_rel_err']:.1e}"
    return f"{result.get('status')}: {result.get('reason')}"


def write_json(run: dict, path: Path) -> None:
    path.write_text(json.dumps(run, indent=1) + "\n")


def write_csv(run: dict, path: Path) -> None:
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(run["results"])


def _by_case(run: dict) -> dict[str, dict[str, dict]]:
    table: dict[str, dict[str, dict]] = {case["id"]: {} for case in run["cases"]}
    for result in run["results"]:
        table[result["case"]][result["impl"]] = result
    return table


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def ratio_rows(run: dict, primary: str) -> list[list[str]]:
    """Rows 'case | vs baseline ... | best baseline' with cells 'time ratio / memory ratio'."""
    from bench.baselines import resolve

    baselines = [name for name in run["impls"] if not resolve(name).primary]
    rows = []
    for case_id, results in _by_case(run).items():
        mine = results.get(primary, {})
        if mine.get("status") != TIMED:
            continue
        row = [case_id]
        timed = {}
        for name in baselines:
            other = results.get(name, {})
            if other.get("status") != TIMED:
                row.append(other.get("status", "—"))
                continue
            timed[name] = other["fwd_bwd_ms"]
            memory = (
                f"{mine['peak_extra_mib'] / other['peak_extra_mib']:.2f}"
                if other["peak_extra_mib"] >= MIN_MEMORY_MIB
                else "n/a"
            )
            row.append(f"{mine['fwd_bwd_ms'] / other['fwd_bwd_ms']:.2f} / {memory}")
        if timed:
            best = min(timed, key=timed.get)
            row.append(f"{best}: {timed[best] / mine['fwd_bwd_ms']:.2f}x")
        else:
            row.append("—")
        rows.append(row)
    return rows


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(run: dict) -> str:
    from bench.baselines import resolve

    device, versions, ceiling = run["device"], run["versions"], run["matmul_ceiling"]
    lines = [
        f"# Weighted LM-head loss benchmark: {device['name']} ({device['type']}), preset `{run['preset']}`",
        "",
        (
            f"`{run['command']}` — {run['created']}; {run['description']}; dtype {run['settings']['dtype']}, "
            f"warmup {run['settings']['warmup']}, timed steps {run['settings']['reps']}, "
            f"torch threads {device['num_threads']} of {device['cpu_count']} CPUs."
        ),
        "",
        "Versions: " + ", ".join(f"{name} {version or 'not installed'}" for name, version in versions.items()),
        "",
        f"Matmul ceiling: {one_line(ceiling)}.",
    ]
    baselines = [name for name in run["impls"] if not resolve(name).primary]
    for primary in [name for name in run["impls"] if resolve(name).primary]:
        rows = ratio_rows(run, primary)
        if not rows:
            continue
        lines += [
            "",
            f"## {primary} / baseline: forward+backward time / peak extra memory",
            "",
            "Below 1: mrloss is faster / smaller. Last column: speed-up of mrloss over the fastest baseline.",
            "",
            *table(["case", *baselines, "fastest baseline"], rows),
        ]
    rows = []
    for result in run["results"]:
        rows.append(
            [
                result["case"],
                result["impl"],
                result["status"],
                _fmt(result.get("forward_ms"), ".2f"),
                _fmt(result.get("backward_ms"), ".2f"),
                _fmt(result.get("fwd_bwd_ms"), ".2f"),
                _fmt(result.get("peak_extra_mib"), ".1f"),
                _fmt(result.get("ceiling_fraction") and 100 * result["ceiling_fraction"], ".1f"),
                _fmt(result.get("loss_rel_err"), ".1e"),
                _fmt(result.get("grad_hidden_rel_err"), ".1e"),
                _fmt(result.get("grad_weight_rel_err"), ".1e"),
            ]
        )
    lines += [
        "",
        "## All measurements",
        "",
        *table(
            [
                "case",
                "impl",
                "status",
                "fwd ms",
                "bwd ms",
                "fwd+bwd ms",
                "peak extra MiB",
                "% matmul ceiling",
                "loss err",
                "grad hidden err",
                "grad weight err",
            ],
            rows,
        ),
    ]
    reasons = sorted({(r["impl"], r["status"], r.get("reason") or "") for r in run["results"] if r["status"] != TIMED})
    if reasons:
        lines += ["", "## Not timed", ""] + [f"- **{impl}** {status}: {reason}" for impl, status, reason in reasons]
    lines += ["", "## Implementations", ""] + [f"- **{name}**: {how}" for name, how in run["impls"].items()]
    lines += ["", "## Method", ""] + [f"- {what}: {how}" for what, how in run["method"].items()]
    return "\n".join(lines) + "\n"


def plot(run: dict, path: Path) -> None:
    """One row per (head, zero fraction): fwd+bwd time vs N, and peak extra memory vs N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = {case["id"]: case for case in run["cases"]}
    groups = sorted({(case["head"]["name"], case["zero_frac"]) for case in cases.values()})
    figure, axes = plt.subplots(len(groups), 2, figsize=(11, 3.2 * len(groups)), squeeze=False)
    colors = {impl: f"C{index}" for index, impl in enumerate(run["impls"])}
    for (head, zero_frac), (time_axis, memory_axis) in zip(groups, axes):
        for impl in run["impls"]:
            points = sorted(
                (cases[r["case"]]["tokens"], r["fwd_bwd_ms"], r["peak_extra_mib"])
                for r in run["results"]
                if r["impl"] == impl
                and r["status"] == TIMED
                and (cases[r["case"]]["head"]["name"], cases[r["case"]]["zero_frac"]) == (head, zero_frac)
            )
            if points:
                tokens, times, memories = zip(*points)
                time_axis.plot(tokens, times, marker="o", label=impl, color=colors[impl])
                memory_axis.plot(tokens, [max(m, 0.0) for m in memories], marker="o", label=impl, color=colors[impl])
        for axis, what in ((time_axis, "fwd+bwd ms"), (memory_axis, "peak extra MiB")):
            axis.set_title(f"{head}, zero-weight fraction {zero_frac:g}", fontsize=9)
            axis.set_xlabel("N tokens")
            axis.set_ylabel(what)
            axis.set_xscale("log", base=2)
            axis.grid(alpha=0.3)
        time_axis.legend(fontsize=7)
    figure.suptitle(f"{run['device']['name']} — preset {run['preset']} ({run['settings']['dtype']})")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_all(run: dict, out_dir: Path, stem: str) -> list[Path]:
    """Write <stem>.json, .csv, .md and .png under out_dir; returns their paths."""
    paths = [out_dir / f"{stem}.{ext}" for ext in ("json", "csv", "md", "png")]
    write_json(run, paths[0])
    write_csv(run, paths[1])
    paths[2].write_text(markdown(run))
    plot(run, paths[3])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rewrite the CSV, Markdown and PNG of a benchmark run.")
    parser.add_argument("run_json", type=Path)
    args = parser.parse_args(argv)
    run = json.loads(args.run_json.read_text())
    for path in write_all(run, args.run_json.parent, args.run_json.stem):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
