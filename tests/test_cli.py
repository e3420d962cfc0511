"""`mrloss` (mrloss/cli.py): every user error is one line on stderr and exit code 2."""

from pathlib import Path

import pytest
from helpers import run_cli, write_config

pytest.importorskip("transformers")  # `mrloss train`


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
    monkeypatch.chdir(tmp_path)
    Path("data.jsonl").write_text('{"text": "a <LEARN>b</LEARN>"}\n')
    Path("empty.jsonl").write_text("\n")
    Path("bad.jsonl").write_text('{"text": "a b c", "defualt_weight": 1}\n')
    Path("extra.jsonl").write_text('{"text": "a <LEARN>b</LEARN>", "score": 1}\n')
    data = {"train_files": [f"{files}.jsonl"]}
    config = write_config(tmp_path / "c.yaml", data=data, trainer={"output_dir": "run", "device": "cpu", **trainer})
    code, err = run_cli(["train", "--config", str(config)], capsys)
    assert code == 2 and err.startswith(f"mrloss train: {message}") and err.count("\n") == 1, err
