"""Benchmark the weighted LM-head loss: ``python -m bench.linear_ce [--quick | --preset NAME] [filters]``.

For every case of the preset: the reference (one process), then every implementation (one process
each, see bench/measure.py). Then the matmul ceiling, and the report: bench/results/<device>-<preset>
.json / .csv / .md / .png (bench/report.py). Implementations that are not installed or cannot run on
the device are reported as such, never dropped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from bench import report
from bench.baselines import IMPLS, availability, known, resolve
from bench.cases import HEADS, PRESETS, Case, learned_flops, learned_tokens

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Above this many learned FLOPs, float64 references are too slow on a CPU (float32 instead).
CPU_FLOAT64_REFERENCE_FLOPS = 2e12
# Triton kernels under the CPU interpreter are checked only up to this many FLOPs (6 N H V).
CPU_INTERPRETER_FLOPS = 1e10
WORKER_TIMEOUT_S = 1800


def device_name(device: str) -> str:
    """Human name of the device: the GPU's name, or the CPU model."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
        return model.group(1).strip() if model else platform.processor() or "cpu"
    except OSError:
        return platform.processor() or "cpu"


def device_slug(device: str, name: str) -> str:
    """File-name form of the device: 'cpu-amd-epyc', 'nvidia-h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug if device == "cuda" else f"cpu-{slug}"


def versions() -> dict:
    """Versions of python and of every package that takes part (None: not installed)."""
    found = {"python": platform.python_version()}
    for package in ("torch", "triton", "transformers", "liger-kernel", "cut-cross-entropy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    try:
        found["mrloss"] = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        found["mrloss"] = None
    return found


def run_worker(args: list[str], device: str, out_dir: Path, label: str, threads: int | None = None) -> dict:
    """Run ``python -m bench.measure`` with ``args``; its JSON result, or a status if it died."""
    out = out_dir / f"{label}.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors leave the RSS at once (see bench/measure.py)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    command = [sys.executable, "-m", "bench.measure", "--device", device, "--out", str(out), *args]
    if threads:
        command += ["--threads", str(threads)]
    try:
        done = subprocess.run(
            command, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"over {WORKER_TIMEOUT_S} s"}
    if out.exists():
        result = json.loads(out.read_text())
        if result["status"] == "error":
            sys.stderr.write(done.stderr[-3000:])
        return result
    status = "oom" if done.returncode in (-9, 137) else "error"
    return {"status": status, "reason": f"worker exited {done.returncode}: {done.stderr.strip()[-500:]}"}


def run_case(case: Case, impl_names: list[str], device: str, options, work_dir: Path) -> list[dict]:
    """Results of every implementation on one case (one worker process each)."""
    flops = 6.0 * case.tokens * case.head.hidden * case.head.vocab
    plans = {}
    for name in impl_names:
        impl = resolve(name)
        status, reason = availability(impl, device, case.head.softcap)
        mode = "time"
        if status == "ok" and device == "cpu" and impl.cpu == "interpreted":
            mode = "verify"
            if flops > CPU_INTERPRETER_FLOPS:
                status, reason = "unsupported", "Triton kernels need a GPU (CPU interpreter too slow at this size)"
        plans[name] = (status, reason, mode)

    results = []
    ref_dtype = "float32" if device == "cpu" and flops > CPU_FLOAT64_REFERENCE_FLOPS else "float64"
    reference = work_dir / f"{case.id}-reference.pt"
    if any(status == "ok" for status, _, _ in plans.values()):
        done = run_worker(
            [
                "--mode",
                "reference",
                "--case",
                json.dumps(case.to_json()),
                "--reference",
                str(reference),
                "--ref-dtype",
                ref_dtype,
            ],
            device,
            work_dir,
            f"{case.id}-reference",
            None if device == "cuda" else os.cpu_count(),
        )
        if done["status"] != "ok":  # nothing to compare with: report it on every implementation
            plans = {
                name: ("error", f"reference failed: {done['status']}: {done.get('reason')}", mode)
                if status == "ok"
                else (status, reason, mode)
                for name, (status, reason, mode) in plans.items()
            }
    for name, (status, reason, mode) in plans.items():
        if status == "ok":
            result = run_worker(
                [
                    "--mode",
                    mode,
                    "--impl",
                    name,
                    "--case",
                    json.dumps(case.to_json()),
                    "--reference",
                    str(reference),
                    "--warmup",
                    str(options.warmup),
                    "--reps",
                    str(options.reps),
                ],
                device,
                work_dir,
                f"{case.id}-{name}",
                options.threads,
            )
        else:
            result = {"status": status, "reason": reason}
        result.update(case=case.id, impl=name, reference_dtype=ref_dtype)
        print(f"{case.id:40s} {name:22s} {report.one_line(result)}", file=sys.stderr, flush=True)
        results.append(result)
    reference.unlink(missing_ok=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="cases to run (default: 'full' on a GPU, 'quick' on a CPU)",
    )
    parser.add_argument("--quick", action="store_true", help="same as --preset quick (small fp32 CPU shapes)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--impls", help=f"comma-separated subset of: {', '.join(IMPLS)} (mrloss ones also as NAME@CHUNK_SIZE)"
    )
    parser.add_argument(
        "--chunk-sizes",
        help="comma-separated chunk sizes: each mrloss implementation also runs as NAME@C (chunk_size=C)",
    )
    parser.add_argument("--heads", help=f"comma-separated subset of: {', '.join(HEADS)}")
    parser.add_argument("--tokens", help="comma-separated N values (replaces the preset's)")
    parser.add_argument("--zero-fracs", help="comma-separated zero-weight fractions (replaces the preset's)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: GPU 3, CPU 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed steps (default: GPU 10, CPU 3)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads in every worker (default: CPU 1, GPU torch's default)",
    )
    parser.add_argument("--ceiling-size", type=int, default=None, help="matmul ceiling size (GPU 8192, CPU 2048)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default=None, help="result file stem (default: <device>-<preset>)")
    options = parser.parse_args(argv)

    import torch  # the command itself only asks which device there is

    device = options.device if options.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    preset_name = "quick" if options.quick else options.preset or ("full" if device == "cuda" else "quick")
    preset = PRESETS[preset_name]
    on_gpu = device == "cuda"
    options.warmup = options.warmup if options.warmup is not None else (3 if on_gpu else 1)
    options.reps = max(1, options.reps if options.reps is not None else (10 if on_gpu else 3))
    options.threads = options.threads or (None if on_gpu else 1)
    impl_names = options.impls.split(",") if options.impls else list(preset.impls or IMPLS)
    unknown = [name for name in impl_names if not known(name)]
    if unknown:
        parser.error(f"unknown implementations {unknown}; known: {list(IMPLS)}")
    for chunk in options.chunk_sizes.split(",") if options.chunk_sizes else []:
        if not chunk.isdigit() or int(chunk) < 1:
            parser.error(f"--chunk-sizes: {chunk!r} is not a positive integer")
        impl_names += [f"{name}@{chunk}" for name in list(impl_names) if "@" not in name and resolve(name).primary]
    unknown = [head for head in (options.heads or "").split(",") if head and head not in HEADS]
    if unknown:
        parser.error(f"unknown heads {unknown}; known: {list(HEADS)}")
    cases = preset.cases(
        heads=options.heads and options.heads.split(","),
        tokens=options.tokens and [int(n) for n in options.tokens.split(",")],
        zero_fracs=options.zero_fracs and [float(f) for f in options.zero_fracs.split(",")],
    )

    name = device_name(device)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="mrloss-bench-") as work:
        work_dir = Path(work)
        ceiling_size = options.ceiling_size or (8192 if on_gpu else 2048)
        ceiling = run_worker(
            [
                "--mode",
                "ceiling",
                "--dtype",
                preset.dtype,
                "--size",
                str(ceiling_size),
                "--warmup",
                str(options.warmup),
                "--reps",
                str(max(options.reps, 3)),
            ],
            device,
            work_dir,
            "ceiling",
            options.threads,
        )
        print(f"matmul ceiling: {report.one_line(ceiling)}", file=sys.stderr, flush=True)
        for case in cases:
            results.extend(run_case(case, impl_names, device, options, work_dir))

    for result in results:
        case = next(c for c in cases if c.id == result["case"])
        if result.get("fwd_bwd_ms") and ceiling.get("tflops"):
            achieved = learned_flops(case) / (result["fwd_bwd_ms"] * 1e-3) / 1e12
            result["achieved_tflops"] = achieved
            result["ceiling_fraction"] = achieved / ceiling["tflops"]
    run = {
        "schema": report.SCHEMA,
        "preset": preset_name,
        "description": preset.description,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.linear_ce", *(argv if argv is not None else sys.argv[1:])]),
        "device": {
            "type": device,
            "name": name,
            "num_threads": options.threads or torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        },
        "versions": versions(),
        "settings": {"warmup": options.warmup, "reps": options.reps, "dtype": preset.dtype},
        "method": report.METHOD,
        "matmul_ceiling": ceiling,
        "impls": {impl_name: resolve(impl_name).how for impl_name in impl_names},
        "cases": [
            {
                **case.to_json(),
                "id": case.id,
                "learned_tokens": learned_tokens(case),
                "learned_flops": learned_flops(case),
            }
            for case in cases
        ],
        "results": results,
        "not_run": [
            {"case": r["case"], "impl": r["impl"], "status": r["status"], "reason": r.get("reason")}
            for r in results
            if r["status"] not in ("ok", "verified")
        ],
    }
    stem = options.name or f"{device_slug(device, name)}-{preset_name}"
    paths = report.write_all(run, options.out_dir, stem)
    print("\n".join(str(path) for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
