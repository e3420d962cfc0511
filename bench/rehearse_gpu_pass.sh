#!/usr/bin/env bash
# CPU rehearsal of bench/gpu_pass.sh on the GPU machine's image (issue #24), on a machine without a GPU:
#
#   bash bench/rehearse_gpu_pass.sh [--drop WHEEL_NAME] [--reuse] [WORK_DIR]    (default WORK_DIR: /tmp/mrloss-rehearsal)
#
# 1. A fresh virtual environment with the image's packages that the pass needs (python -m bench.wheel_list
#    --from-image, read in the development environment: `python` on PATH), at the image's versions where
#    bench/image_packages.txt knows them and this machine has them (triton 3.6.0, transformers 5.17.0, accelerate
#    1.15.0, tokenizers 0.23.2, huggingface-hub 1.33.0); torch 2.13.0 CPU stands in for 2.11 (CUDA) and this Python
#    (3.11) for 3.12; the others at the registry's versions. Anything of the carried set that those pulled in is
#    uninstalled: the carried wheels are the only source of what the image lacks, as on the machine.
# 2. The carried set (python -m bench.wheel_list) built for this Python by bench/make_wheels.sh (PY_VERSION), then
#    installed the way the pass installs it (the closure is read from the development environment, `python` on
#    PATH, where the carried packages are installed): pip install --no-index --no-deps --target SITE, SITE on PYTHONPATH, mrloss
#    from the tree. --drop NAME deletes that wheel first (e.g. --drop dill): the rehearsal must then fail.
# 3. What the pass runs that a CPU can: the import check, gpu_pass.sh --dry-run, the collection of every test with
#    -m gpu (all skip here; a module that does not import is an error), and the CPU tests of the code the GPU tests
#    exercise (Triton kernels through TRITON_INTERPRET=1, the chunked loss, the HF metrics, the pass's own tools).
# --reuse keeps WORK_DIR/venv from an earlier run (step 1 skipped; the wheels and SITE are always rebuilt).
# Exit status 0 only when every step passed. The GPU stages themselves need the device (bench/README.md).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
drop=""
work=""
reuse=0
while [ $# -gt 0 ]; do
  case "$1" in
    --drop) drop="$2"; shift 2 ;;
    --reuse) reuse=1; shift ;;
    -h|--help) sed -n '4p' "$0" | sed 's/^#  *//'; exit 0 ;;
    *) work="$1"; shift ;;
  esac
done
work="${work:-${TMPDIR:-/tmp}/mrloss-rehearsal}"
PYTHON_HOST="${PYTHON_HOST:-python3}"
started=$(date +%s)
step() { echo "== [$(( $(date +%s) - started )) s] $*"; }

py="$work/venv/bin/python"
if [ "$reuse" = 1 ] && [ -x "$py" ]; then
  step "venv: reusing $work/venv"
  rm -rf "$work/wheels" "$work/site" "$work/pass"
else
  rm -rf "$work" && mkdir -p "$work"
  step "venv: the image's versions where this machine has them ($work/venv)"
  "$PYTHON_HOST" -m venv "$work/venv"
  # the image's packages the pass needs (python -m bench.wheel_list --from-image: its roots on the image and what the
  # carried set requires from it), at the image's versions where known; torch 2.13.0 CPU stands in for 2.11; numpy
  # below 2.4 instead of the image's 2.5.2 (no build for this Python here, and triton 3.6's CPU interpreter, which only
  # the rehearsal uses, calls int() on 1-element arrays, which numpy >= 2.4 refuses: every interpreted kernel fails)
  mapfile -t from_image < <(cd "$REPO" && python -m bench.wheel_list --from-image \
    | sed -e 's/^torch==.*/torch==2.13.0/' -e 's/^numpy==.*/numpy<2.4/')
  [ "${#from_image[@]}" -gt 0 ] || { echo "bench.wheel_list --from-image printed nothing" >&2; exit 1; }
  echo "from the image: ${from_image[*]}"
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q "torch==2.13.0"
  "$py" -m pip install -q "${from_image[@]}"
fi
py_version="$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"

step "carried wheels for CPython $py_version (bench/make_wheels.sh, with the development environment's python)"
PY_VERSION="$py_version" PYTHONPATH="$REPO" bash "$REPO/bench/make_wheels.sh" "$work/wheels"
carried=$(sed 's/==.*//' "$work/wheels/requirements.txt" | tr '\n' ' ')
# shellcheck disable=SC2086
"$py" -m pip uninstall -q -y $carried 2>/dev/null || true
if [ -n "$drop" ]; then
  step "dropping the wheel of $drop (the rehearsal must fail)"
  compgen -G "$work/wheels/${drop//-/_}-*.whl" >/dev/null || { echo "no wheel of $drop in $work/wheels" >&2; exit 2; }
  rm -f "$work/wheels/${drop//-/_}"-*.whl
fi
site="$work/site"
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$work/wheels"/*.whl
export PYTHONPATH="$REPO:$site"
export TRITON_INTERPRET=1
cd "$REPO"
"$py" -c "import torch, triton, transformers, accelerate; print('rehearsal: python', __import__('sys').version.split()[0], \
'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, \
'accelerate', accelerate.__version__)"

step "what the pass imports"
"$py" -m bench.wheel_list --check-imports
step "gpu_pass.sh --dry-run"
PYTHON="$py" bash bench/gpu_pass.sh --dry-run "$work/pass" | tail -1
step "pytest -m gpu: every test module collects (the GPU tests skip on a CPU)"
"$py" -m pytest -q -p no:cacheprovider -m gpu tests
step "the compile check with the image's triton (every kernel configuration, sm_80 and sm_90: no unfit one)"
"$py" -m pytest -q -p no:cacheprovider tests/test_compile.py
step "the CPU tests of what the GPU tests exercise"
"$py" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_loss.py tests/test_bench.py tests/test_hf.py \
  -k "metrics or chunk or dry_run or wheel_list or roofline or gpu_summary or token_accuracy or matches_float64"
step "rehearsal passed"
