#!/usr/bin/env bash
# One GPU pass (issue #11): GPU tests, the deciding benchmark cases, a short training run; under 8 minutes.
#
#   bash bench/gpu_pass.sh [--dry-run] OUTDIR
#
# On a bare H100/H200 machine with torch and triton: installs the wheels of $WHEELS (default bench/wheels,
# built by bench/make_wheels.sh) with pip --no-index --no-deps, then runs every stage below under `timeout`
# with its own budget (seconds). OUTDIR receives gpu_pass.log (stage start / end / elapsed and all output),
# logs/<stage>.log, stages.tsv, pytest-gpu.xml, bench/*.{json,csv,md,png}, train/ (the run, metrics.json) and
# summary.{json,md} (every stage's status, the ratio table, tokens/s). A stage that fails, times out or is
# skipped is written as such; the exit status is 0 only when every stage passed. --dry-run prints each stage's
# command and budget and runs nothing.
set -u -o pipefail

usage() { sed -n '4p' "$0" | sed 's/^#  *//'; }

dry_run=0
out=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_pass.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
    *) out="$arg" ;;
  esac
done
[ -n "$out" ] || { usage >&2; exit 2; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${WHEELS:-$REPO/bench/wheels}"
PYTHON="${PYTHON:-python}"
LIMIT_S=480   # the whole pass, kill grace included
KILL_GRACE_S=5  # after its budget a stage gets SIGTERM, then SIGKILL this much later
if [ "$dry_run" = 1 ]; then out="$(realpath -m "$out")"; else out="$(mkdir -p "$out" && cd "$out" && pwd)" || exit 2; fi
bench_args="--preset gpu-goals --warmup 2 --reps 5 --out-dir $out/bench"
# a ~100M-parameter Llama from a config (BPE tokenizer trained on the example data, which the built-in config
# writes to examples/sft/multi_region/data/ of the checkout), bf16, packed 1024-token rows
train_overrides="model.hidden_size=1024 model.num_layers=8 model.num_heads=16 model.num_kv_heads=4 \
model.intermediate_size=2816 model.vocab_size=8192 model.dtype=bfloat16 data.max_length=1024 data.pack=true \
trainer.output_dir=$out/train trainer.device=cuda \
trainer.max_steps=300 trainer.per_device_batch_size=8 trainer.learning_rate=3.0e-4 trainer.logging_steps=25 \
trainer.save_steps=null"

STAGES=(env setup pytest-gpu bench-llama3-8b bench-gemma2-2b train summary)
declare -A BUDGET=([env]=10 [setup]=25 [pytest-gpu]=90 [bench-llama3-8b]=120 [bench-gemma2-2b]=110 [train]=75
                   [summary]=10)
declare -A COMMAND=(
  [env]="nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv && $PYTHON -c 'import torch, triton; \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); \
assert torch.cuda.is_available(), \"no CUDA device\"; print(torch.cuda.get_device_name())'"
  [setup]="$PYTHON -m pip install --no-index --no-deps --quiet $WHEELS/*.whl && $PYTHON -m pip list 2>/dev/null \
| grep -iE '^(torch|triton|transformers|liger.kernel|cut.cross.entropy|trl) '"
  [pytest-gpu]="$PYTHON -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
--junitxml=$out/pytest-gpu.xml tests"
  [bench-llama3-8b]="$PYTHON -m bench.linear_ce $bench_args --heads llama3-8b --name gpu-goals-llama3-8b"
  [bench-gemma2-2b]="$PYTHON -m bench.linear_ce $bench_args --heads gemma2-2b --name gpu-goals-gemma2-2b"
  [train]="$PYTHON -m mrloss train --config tag_based $train_overrides"
  [summary]="$PYTHON -m bench.gpu_summary $out"
)

total=0
for stage in "${STAGES[@]}"; do total=$((total + BUDGET[$stage])); done
worst=$((total + KILL_GRACE_S * ${#STAGES[@]}))

# why a stage does not run ("" if it does)
skip_reason() {
  case "$1" in
    setup) compgen -G "$WHEELS/*.whl" >/dev/null || echo "no wheels in $WHEELS (bash bench/make_wheels.sh builds them)" ;;
    env|summary) ;;
    *) [ "${status[env]:-}" = ok ] || echo "stage env did not pass (no CUDA device or no torch)" ;;
  esac
}

if [ "$dry_run" = 1 ]; then
  echo "gpu_pass dry run: OUTDIR=$out WHEELS=$WHEELS PYTHON=$PYTHON (cwd $REPO, PYTHONPATH=$REPO)"
  for stage in "${STAGES[@]}"; do
    printf 'stage %-16s budget %4d s: %s\n' "$stage" "${BUDGET[$stage]}" "${COMMAND[$stage]}"
  done
  echo "total budget: $total s; with ${KILL_GRACE_S} s kill grace per stage at most $worst s (limit $LIMIT_S s)"
  exit 0
fi

cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out/logs"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$out/gpu_pass.log"; }
printf 'stage\tstatus\trc\tbudget_s\telapsed_s\treason\n' > "$out/stages.tsv"
declare -A status
log "gpu pass: $total s of stage budgets (at most $worst s), OUTDIR $out"
for stage in "${STAGES[@]}"; do
  budget=${BUDGET[$stage]}
  reason="$(skip_reason "$stage")"
  if [ -n "$reason" ]; then
    status[$stage]=skipped
    log "stage $stage: skipped: $reason"
    printf '%s\tskipped\t\t%s\t0\t%s\n' "$stage" "$budget" "$reason" >> "$out/stages.tsv"
    continue
  fi
  log "stage $stage: start (budget $budget s): ${COMMAND[$stage]}"
  start_ms=$(($(date +%s%N) / 1000000))
  timeout -k "$KILL_GRACE_S" "$budget" bash -c "${COMMAND[$stage]}" 2>&1 | tee "$out/logs/$stage.log" >> "$out/gpu_pass.log"
  rc=${PIPESTATUS[0]}
  elapsed_ms=$(($(date +%s%N) / 1000000 - start_ms))
  elapsed="$((elapsed_ms / 1000)).$((elapsed_ms % 1000 / 100))"
  case $rc in
    0) status[$stage]=ok; reason="" ;;
    124|137) status[$stage]=timeout; reason="over its budget of $budget s" ;;
    *) status[$stage]=failed; reason="exit status $rc (logs/$stage.log)" ;;
  esac
  log "stage $stage: end: ${status[$stage]} (rc $rc) after $elapsed s"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$stage" "${status[$stage]}" "$rc" "$budget" "$elapsed" "$reason" \
    >> "$out/stages.tsv"
done
failed=0
for stage in "${STAGES[@]}"; do [ "${status[$stage]}" = ok ] || failed=1; done
log "gpu pass: done ($([ $failed = 0 ] && echo "every stage passed" || echo "some stages did not pass")); \
summary: $out/summary.md"
exit $failed
