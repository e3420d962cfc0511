"""A new user's first minutes: a fresh virtual environment, ``pip install <repo>`` (not editable), then
``mrloss demo`` and a built-in config from another folder -- what README's two set-up commands promise."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(command, **options):
    result = subprocess.run(command, capture_output=True, text=True, **options)
    assert result.returncode == 0, (
        f"{command} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.mark.slow
def test_fresh_install_runs_the_demo_and_the_builtin_configs(tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python, mrloss = venv / "bin" / "python", venv / "bin" / "mrloss"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    # torch first, pinned to the local CPU build: the package's plain torch requirement would pull a CUDA build
    _run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], env=env)
    _run([str(python), "-m", "pip", "install", "-q", str(REPO), "torch==2.13.0"], env=env)

    elsewhere = tmp_path / "elsewhere"  # no checkout here: everything comes from the installed wheel
    elsewhere.mkdir()
    started = time.perf_counter()
    demo = _run([str(mrloss), "demo", "--steps", "3", "--output-dir", "demo"], cwd=elsewhere, env=env)
    print(f"mrloss demo --steps 3 after a fresh install: {time.perf_counter() - started:.1f} s")
    assert "[4/4] mean token loss per region type" in demo.stdout
    assert (elsewhere / "demo/run/model.safetensors").exists()

    listing = _run([str(mrloss), "configs"], cwd=elsewhere, env=env).stdout
    assert {"tag_based", "position_based", "structured"} <= {line.split()[0] for line in listing.splitlines() if line}
    assert "site-packages" in listing  # the installed copy, not the checkout
    printed = _run([str(mrloss), "configs", "tag_based"], cwd=elsewhere, env=env).stdout
    assert "write_examples: true" in printed

    overrides = ["trainer.max_steps=2", "trainer.output_dir=run", "trainer.device=cpu", "trainer.save_steps=null"]
    _run([str(mrloss), "train", "--config", "tag_based", *overrides], cwd=elsewhere, env=env)
    assert (elsewhere / "run/metrics.json").exists()
    assert (elsewhere / "examples/sft/multi_region/data/tag_based.jsonl").exists()  # the shipped example data
