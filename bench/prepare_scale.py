"""`mrloss prepare` at scale: wall time and peak memory on a generated tag_based JSONL.

    python -m bench.prepare_scale                       # 200 MB file (about 95k samples), this checkout
    python -m bench.prepare_scale --size-mb 40 --code /tmp/old   # another checkout's mrloss (before/after)
    python -m bench.prepare_scale --tokenizer DIR --num-proc 2   # options after the known ones go to prepare

The data file is generated once (seeded) under ``tests/data/scale/`` (git-ignored, never committed):
samples of the shipped examples' tag_based texts, 3 to 5 per sample, numbered so that no two are equal.
`mrloss prepare FILE --output-dir OUT --val-fraction 0.05 --force` then runs in a child process; its
process tree (workers included) is sampled every 200 ms from /proc (in the measured checkout: ``python -m``
puts the working directory first on sys.path). Printed: wall seconds; CPU seconds (user + system) of the
main process (the serial part: reading, writing, training the default tokenizer) and of the whole tree
(on a shared machine the fairer comparison of two versions); peak RSS of the main process and of the
largest worker, and peak PSS of the tree (shared pages counted once, so that forked workers are not
counted twice); and prepare's own summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "tests/data/scale"


def generate(path: Path, size_mb: float, seed: int = 0) -> int:
    """Write a tag_based JSONL of about ``size_mb`` MB to ``path`` (if missing); returns its line count."""
    if path.exists():
        return sum(1 for _ in open(path, "rb"))
    from mrloss.data.examples import EXAMPLES

    texts = [sample["text"] for sample in EXAMPLES]
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    written, count = 0, 0
    with open(temporary, "w", encoding="utf-8") as handle:
        while written < size_mb * 1e6:
            parts = [f"[{count}.{k}] " + rng.choice(texts) for k in range(rng.randint(3, 5))]
            line = json.dumps({"id": f"s{count}", "text": "\n".join(parts), "source": "bench"}, ensure_ascii=False)
            handle.write(line + "\n")
            written += len(line.encode("utf-8")) + 1
            count += 1
    os.replace(temporary, path)
    return count


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (from /proc/PID/task/TID/children)."""
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as handle:
                    stack += [int(child) for child in handle.read().split()]
        except OSError:
            continue
    return found


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in kB of one process, 0 when it is gone."""
    values = {"Rss:": 0, "Pss:": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                key, *rest = line.split()
                if key in values:
                    values[key] = int(rest[0])
    except OSError:
        pass
    return values["Rss:"], values["Pss:"]


def _cpu_seconds(pid: int) -> float:
    """User + system seconds of one process so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(command: list[str], env: dict, cwd: Path) -> dict:
    """Run ``command`` in ``cwd``; wall and CPU seconds and peak memory (MB) of its process tree."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"main_cpu_seconds": 0.0, "main_rss_mb": 0.0, "worker_rss_mb": 0.0, "tree_pss_mb": 0.0, "processes": 1}
    done = threading.Event()

    def sample():
        while not done.is_set():
            pids = _tree(process.pid)
            memory = {pid: _memory_kb(pid) for pid in pids}
            peaks["processes"] = max(peaks["processes"], len(pids))
            peaks["main_cpu_seconds"] = max(peaks["main_cpu_seconds"], _cpu_seconds(process.pid))
            peaks["main_rss_mb"] = max(peaks["main_rss_mb"], memory.get(process.pid, (0, 0))[0] / 1024)
            workers = [rss for pid, (rss, _) in memory.items() if pid != process.pid]
            peaks["worker_rss_mb"] = max([peaks["worker_rss_mb"]] + [rss / 1024 for rss in workers])
            peaks["tree_pss_mb"] = max(peaks["tree_pss_mb"], sum(pss for _, pss in memory.values()) / 1024)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    output, _ = process.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers too: prepare waits for them
    done.set()
    sampler.join()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "cpu_seconds": cpu, "returncode": process.returncode, "output": output, **peaks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prepare_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=200.0, help="size of the generated JSONL")
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose mrloss runs (default: this one)")
    parser.add_argument("--output-dir", type=Path, default=DATA_DIR / "out")
    args, prepare_options = parser.parse_known_args(argv)
    path = DATA_DIR / f"tag_based_{args.size_mb:g}mb.jsonl"
    samples = generate(path, args.size_mb)
    command = [sys.executable, "-m", "mrloss", "prepare", str(path), "--output-dir", str(args.output_dir.resolve())]
    command += ["--val-fraction", "0.05", "--force", *prepare_options]
    env = {**os.environ, "PYTHONPATH": str(args.code.resolve())}
    result = measure(command, env, args.code.resolve())  # in the checkout: `python -m` puts the cwd first
    print(result.pop("output"))
    print(f"file: {path} ({path.stat().st_size / 1e6:.0f} MB, {samples} samples); code: {args.code}")
    print(json.dumps({key: round(value, 1) for key, value in result.items()}))
    return result["returncode"]


if __name__ == "__main__":
    sys.exit(main())
