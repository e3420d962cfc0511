"""`mrloss` (mrloss/cli.py): start-up without heavy imports, --version, one line per user error (exit 2)."""

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli, write_config

import mrloss
from mrloss.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_help_and_version_import_no_torch():
    """Before (#23 rough edges): ``mrloss --help`` took ~4 s, importing torch through ``mrloss/__init__``.
    Measured on the shared 2-core machine, same minute: 3.59 s before, 0.06 s after (wall, load 3.5)."""
    probe = (
        "import sys; from mrloss.cli import main; main(['--help']); main(['--version']); "
        "print(sorted(m for m in ('torch', 'transformers', 'yaml', 'numpy') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    lines = result.stdout.splitlines()
    assert lines[-1] == "[]" and f"mrloss {mrloss.__version__}" in lines and lines[0].startswith("usage: mrloss")


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"mrloss {mrloss.__version__}\n"


def test_public_names_load_on_first_use():
    from mrloss.ops.api import linear_cross_entropy

    assert mrloss.linear_cross_entropy is linear_cross_entropy and mrloss.IGNORE_INDEX == -100
    assert {"linear_cross_entropy", "LinearCrossEntropyLoss", "TokenMetrics", "IGNORE_INDEX"} <= set(dir(mrloss))
    with pytest.raises(AttributeError, match="linear_crossentropy"):
        _ = mrloss.linear_crossentropy


@pytest.mark.parametrize(
    "trainer, files, message",
    [
        ({"learning_rate": float("nan")}, "data", "config trainer.learning_rate: expected a finite number, got nan"),
        ({"per_device_batch_size": 0}, "data", "config trainer.per_device_batch_size: expected a value > 0, got 0"),
        ({"warmup_ratio": 1.5}, "data", "config trainer.warmup_ratio: expected a value >= 0 and <= 1, got 1.5"),
        ({}, "missing", "config data: file(s) not found: missing.jsonl"),
        ({}, "empty", "no samples in empty.jsonl"),
        ({}, "bad", "sample bad.jsonl:1, field 'defualt_weight'"),
        ({}, "extra", "sample extra.jsonl:1, field 'score': unknown key 'score'"),
    ],
    ids=["lr-nan", "batch-size-0", "warmup-1.5", "missing-file", "empty-file", "bad-sample", "unknown-key"],
)
def test_cli_user_errors_are_one_line(tmp_path, capsys, monkeypatch, trainer, files, message):
    """Before: raw tracebacks (even for our own ConfigError outside load_config)."""
    pytest.importorskip("transformers")  # `mrloss train`
    monkeypatch.chdir(tmp_path)
    Path("data.jsonl").write_text('{"text": "a <LEARN>b</LEARN>"}\n')
    Path("empty.jsonl").write_text("\n")
    Path("bad.jsonl").write_text('{"text": "a b c", "defualt_weight": 1}\n')
    Path("extra.jsonl").write_text('{"text": "a <LEARN>b</LEARN>", "score": 1}\n')
    data = {"train_files": [f"{files}.jsonl"]}
    config = write_config(tmp_path / "c.yaml", data=data, trainer={"output_dir": "run", "device": "cpu", **trainer})
    code, err = run_cli(["train", "--config", str(config)], capsys)
    assert code == 2 and err.startswith(f"mrloss train: {message}") and err.count("\n") == 1, err
