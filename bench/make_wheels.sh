#!/usr/bin/env bash
# Build the wheel folder of bench/gpu_pass.sh on a machine that reaches the package registry:
#
#   bash bench/make_wheels.sh [WHEELS_DIR]        (default bench/wheels)
#
# The wheels are every package the GPU pass needs besides torch and triton (python -m bench.wheel_list: the
# dependency closure of mrloss, the Trainer, the bench report, liger-kernel, cut-cross-entropy and trl), at
# the versions installed in this environment. PYTHON picks the interpreter (default python); for a GPU
# machine with another Python or platform, pass pip's target options in PIP_TARGET, e.g.
# PIP_TARGET="--python-version 3.12 --platform manylinux_2_28_x86_64".
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${1:-$REPO/bench/wheels}"
PYTHON="${PYTHON:-python}"
mkdir -p "$WHEELS"
requirements="$WHEELS/requirements.txt"
(cd "$REPO" && "$PYTHON" -m bench.wheel_list) > "$requirements"
# shellcheck disable=SC2086
"$PYTHON" -m pip download --no-deps --only-binary=:all: ${PIP_TARGET:-} -d "$WHEELS" -r "$requirements"
echo "$(ls "$WHEELS"/*.whl | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1), in $WHEELS"
