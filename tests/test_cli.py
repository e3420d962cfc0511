"""`mrloss` (mrloss/cli.py): start-up without heavy imports, --version, one line per user error."""

import subprocess
import sys
from pathlib import Path

import pytest

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
