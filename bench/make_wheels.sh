#!/usr/bin/env bash
# Build the wheel folder that bench/gpu_pass.sh installs on the GPU machine (no registry there):
#
#   bash bench/make_wheels.sh [WHEELS_DIR]        (default bench/wheels, git-ignored)
#
# Exactly the packages the pass imports and the image lacks (python -m bench.wheel_list: the closure of the pass's
# requirements at the versions installed here, stopping at bench/image_packages.txt), as wheels for the image's
# CPython 3.12 on manylinux x86_64 (pure-python wheels where that is all there is). PY_VERSION=3.11 builds the same
# set for this machine's Python instead (the CPU rehearsal, bench/rehearse_gpu_pass.sh). Then prints the wheels'
# size and that of everything a device call carries (tracked + untracked-not-ignored files + the wheels), and
# fails above the device's 64 MiB.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${1:-$REPO/bench/wheels}"
PYTHON="${PYTHON:-python}"
PY_VERSION="${PY_VERSION:-3.12}"
LIMIT_BYTES=$((64 * 1024 * 1024))
rm -rf "$WHEELS" && mkdir -p "$WHEELS"
requirements="$WHEELS/requirements.txt"
(cd "$REPO" && "$PYTHON" -m bench.wheel_list --python-version "$PY_VERSION") > "$requirements"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${platforms[@]}" -d "$WHEELS" -r "$requirements"
wheel_bytes=$(cat "$WHEELS"/*.whl | wc -c)
tree_bytes=$(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 -r cat 2>/dev/null | wc -c)
total=$((wheel_bytes + tree_bytes))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "$(ls "$WHEELS"/*.whl | wc -l) wheels for CPython $PY_VERSION in $WHEELS: $(mib "$wheel_bytes")"
echo "a device call carries the working tree ($(mib "$tree_bytes")) + the wheels = $(mib "$total") of 64 MiB"
[ "$total" -le "$LIMIT_BYTES" ] || { echo "make_wheels.sh: over the device's 64 MiB" >&2; exit 1; }
