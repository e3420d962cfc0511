"""Summary of a GPU pass (bench/gpu_pass.sh): ``python -m bench.gpu_summary OUTDIR``.

Reads OUTDIR/stages.tsv (every stage's status, exit status, budget and elapsed seconds), pytest-gpu.xml,
bench/gpu-goals-*.json (bench.linear_ce runs) and train/metrics.json (or, when the run did not finish, the
logs of logs/train.log), and writes OUTDIR/summary.json and OUTDIR/summary.md: the stages, the test counts,
the mrloss-triton / baseline ratio table of every case, and the training tokens/s.
"""

from __future__ import annotations

import ast
import csv
import json
import re
import statistics
import sys
from pathlib import Path
from xml.etree import ElementTree

from bench import report
from bench.baselines import resolve

PRIMARY = "mrloss-triton"
BENCH_STAGE_PREFIX = "bench-"  # stage bench-<head>-z<fraction> writes bench/gpu-goals-<head>-z<fraction>.json


def stages(out: Path) -> list[dict]:
    with open(out / "stages.tsv", newline="") as tsv:
        return list(csv.DictReader(tsv, delimiter="\t"))


def pytest_counts(out: Path) -> dict | None:
    """{tests, failures, errors, skipped} of the GPU tests, and the names of the tests that did not pass."""
    path = out / "pytest-gpu.xml"
    if not path.exists():
        return None
    root = ElementTree.parse(path).getroot()
    counts = {
        key: sum(int(suite.get(key, 0)) for suite in root.iter("testsuite"))
        for key in ("tests", "failures", "errors", "skipped")
    }
    counts["not_passed"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return counts


def bench_results(out: Path, stage_rows: list[dict]) -> dict[str, dict | None]:
    """{stage: its ratio rows (bench.report.ratio_rows), baselines and the measured-against-predicted rows, or None
    where it wrote no run JSON}."""
    results = {}
    for stage in (row["stage"] for row in stage_rows if row["stage"].startswith(BENCH_STAGE_PREFIX)):
        stem = "gpu-goals-" + stage.removeprefix(BENCH_STAGE_PREFIX)
        path = out / "bench" / f"{stem}.json"
        run = json.loads(path.read_text()) if path.exists() else None
        results[stage] = run and {
            "file": f"bench/{stem}.json",
            "device": run["device"]["name"],
            "baselines": [name for name in run["impls"] if not resolve(name).primary],
            "ratio_rows": report.ratio_rows(run, PRIMARY),
            "predicted_rows": predicted_rows(run),
            "primary_not_timed": [
                f"{r['case']}: {r['status']} {r.get('reason') or ''}"
                for r in run["results"]
                if r["impl"] == PRIMARY and r["status"] != report.TIMED
            ],
        }
    return results


def predicted_rows(run: dict) -> list[list[str]]:
    """Rows 'case | implementation | measured ms | predicted ms (bench.roofline) | measured / predicted | measured /
    matmul time' for every timed implementation the roofline models (mrloss at each chunk size too); the matmul time
    is 6 N_learned H V at the matmul ceiling measured in the same run (the #24 goal: <= 1.2 for mrloss)."""
    from bench import roofline

    device = roofline.device_for(run["device"]["name"])
    ceiling = (run.get("matmul_ceiling") or {}).get("tflops")
    cases = {case["id"]: case for case in run["cases"]}
    rows = []
    for result in run["results"]:
        if result.get("status") != report.TIMED or result["case"] not in cases:
            continue
        case_json = cases[result["case"]]
        case = next((c for c in roofline.goal_cases() if c.id == result["case"]), None)
        modelled = device is not None and case is not None
        predicted = roofline.predict_bench_impl(case, result["impl"], device) if modelled else None
        measured = result["fwd_bwd_ms"]
        matmul_ms = case_json["learned_flops"] / (ceiling * 1e12) * 1e3 if ceiling else None
        rows.append(
            [
                result["case"],
                result["impl"],
                f"{measured:.1f}",
                "—" if predicted is None else f"{predicted['seconds'] * 1e3:.1f}",
                "—" if predicted is None else f"{measured / (predicted['seconds'] * 1e3):.2f}",
                "—" if matmul_ms is None else f"{measured / matmul_ms:.2f}",
            ]
        )
    return rows


def training(out: Path) -> dict | None:
    """Tokens/s of the training run: the median of its logged intervals after the first (which holds the
    compilation), from metrics.json, else from the log lines of an unfinished run."""
    metrics = out / "train" / "metrics.json"
    if metrics.exists():
        history, source = json.loads(metrics.read_text())["log_history"], "train/metrics.json"
    elif (out / "logs" / "train.log").exists():
        log = (out / "logs" / "train.log").read_text()
        lines = re.findall(r"\{[^{}]*'tokens_per_second'[^{}]*\}", log)  # the Trainer's printed logs
        history, source = [ast.literal_eval(line) for line in lines], "logs/train.log (the run did not finish)"
    else:
        return None
    logged = [entry for entry in history if "tokens_per_second" in entry]
    if not logged:
        return {"source": source, "tokens_per_second": None}
    steady = [float(entry["tokens_per_second"]) for entry in logged[1:]] or [float(logged[0]["tokens_per_second"])]
    return {
        "source": source,
        "tokens_per_second": statistics.median(steady),
        "intervals": len(steady),
        "first_loss": float(logged[0]["loss"]),
        "last_loss": float(logged[-1]["loss"]),
        "steps": history[-1].get("step"),
    }


def markdown(summary: dict) -> str:
    lines = ["# GPU pass", "", "## Stages", ""]
    lines += report.table(
        ["stage", "status", "exit", "budget s", "elapsed s", "reason"],
        [
            [s["stage"], s["status"], s["rc"] or "—", s["budget_s"], s["elapsed_s"], s["reason"] or ""]
            for s in summary["stages"]
        ],
    )
    lines += [
        "",
        f"Total elapsed: {summary['elapsed_s']:.0f} s of {summary['budget_s']} s budgeted.",
        "",
        "## GPU tests (pytest -m gpu)",
        "",
    ]
    tests = summary["pytest"]
    lines.append(
        "no pytest-gpu.xml (stage did not run or died)"
        if tests is None
        else f"{tests['tests']} tests: {tests['failures']} failed, {tests['errors']} errors, "
        f"{tests['skipped']} skipped" + "".join(f"\n- not passed: `{name}`" for name in tests["not_passed"])
    )
    lines += [
        "",
        f"## {PRIMARY} / baseline: forward+backward time / peak extra memory",
        "",
        "Below 1: mrloss is faster / smaller. Last column: speed-up of mrloss over the fastest baseline.",
        "",
    ]
    for stage, bench in summary["bench"].items():
        if bench is None:
            status = next(s for s in summary["stages"] if s["stage"] == stage)
            lines += [f"- {stage}: no results ({status['status']}: {status['reason'] or 'see its log'})", ""]
            continue
        lines += [f"### {stage} ({bench['device']})", ""]
        if bench["ratio_rows"]:
            lines += report.table(["case", *bench["baselines"], "fastest baseline"], bench["ratio_rows"])
        lines += [f"- {PRIMARY} not timed: {entry}" for entry in bench["primary_not_timed"]]
        if bench.get("predicted_rows"):
            lines += ["", "Measured against the roofline's prediction (`python -m bench.roofline`) and the step's"]
            lines += ["matmul time at the measured ceiling (`@C`: chunk_size C; the default is 2048):", ""]
            header = ["case", "implementation", "measured ms", "predicted ms", "measured / predicted", "x matmul"]
            lines += report.table(header, bench["predicted_rows"])
        lines += ["", f"Every measurement: {bench['file'].removesuffix('.json')}.md", ""]
    lines += ["## Training (mrloss train, small Llama, bf16)", ""]
    train = summary["train"]
    lines.append(
        "no training metrics (stage did not run or died before its first log)"
        if train is None
        else f"{_fmt(train['tokens_per_second'])} tokens/s (median of {train.get('intervals', 0)} logged "
        f"intervals after the first; loss {train.get('first_loss')} -> {train.get('last_loss')}; "
        f"from {train['source']})"
    )
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "—" if value is None else f"{value:,.0f}"


def main(argv: list[str] | None = None) -> int:
    out = Path((argv if argv is not None else sys.argv[1:])[0])
    stage_rows = stages(out)
    summary = {
        "stages": stage_rows,
        "budget_s": sum(int(s["budget_s"]) for s in stage_rows),
        "elapsed_s": sum(float(s["elapsed_s"]) for s in stage_rows),
        "pytest": pytest_counts(out),
        "bench": bench_results(out, stage_rows),
        "train": training(out),
    }
    report.write_json(summary, out / "summary.json")
    (out / "summary.md").write_text(markdown(summary))
    print(out / "summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
