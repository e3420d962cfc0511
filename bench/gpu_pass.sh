#!/usr/bin/env bash
# One GPU pass (issues #11, #24): GPU tests, the deciding benchmark cases, a short training run; under 7 minutes.
#
#   bash bench/gpu_pass.sh [--dry-run] [--pack DIR] OUTDIR
#
# On the lent H100/H200 image (Python 3.12, its own torch, triton, transformers, accelerate, numpy, pyarrow: see
# bench/image_packages.txt): installs the wheels of $WHEELS (default bench/wheels, built here by
# bench/make_wheels.sh: only what the image lacks) with pip --no-index --no-deps --target $SITE, puts $SITE and the
# tree on PYTHONPATH (mrloss is not installed: it runs from the tree), checks that everything the pass imports
# imports, then runs every stage below under `timeout` with its own budget (seconds). OUTDIR receives
# gpu_pass.log (stage start / end / elapsed and all output), logs/<stage>.log, stages.tsv, pytest-gpu.xml,
# bench/*.{json,csv,md,png}, train/ (the run, metrics.json) and summary.{json,md} (every stage's status, the ratio
# table, measured against the roofline's predicted time, the chunk sizes, tokens/s). A stage that fails, times out
# or is skipped is written as such; the exit status is 0 only when every stage passed. --dry-run prints each
# stage's command and budget and runs nothing. --pack DIR: at the end, DIR gets gpu-pass.tgz (all of OUTDIR) and
# summary.md, summary.json, stages.tsv, gpu_pass.log: 5 files, for the device's $OUT (which returns at most 8 files).
set -u -o pipefail

usage() { sed -n '4p' "$0" | sed 's/^#  *//'; }

dry_run=0
out=""
pack=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --pack) pack="${2:-}"; [ -n "$pack" ] || { usage >&2; exit 2; }; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_pass.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) out="$1" ;;
  esac
  shift
done
[ -n "$out" ] || { usage >&2; exit 2; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${WHEELS:-$REPO/bench/wheels}"
SITE="${SITE:-/tmp/mrloss-gpu-site}"  # the carried wheels, installed here (not into the image's environment)
PYTHON="${PYTHON:-python3}"
LIMIT_S=420   # the whole pass, kill grace included
KILL_GRACE_S=3  # after its budget a stage gets SIGTERM, then SIGKILL this much later
if [ "$dry_run" = 1 ]; then out="$(realpath -m "$out")"; else out="$(mkdir -p "$out" && cd "$out" && pwd)" || exit 2; fi
# the benchmark in one stage per case, so that a timeout loses one case: the deciding implementations (no plain
# [N, V] logits), 1 warm-up and 3 timed steps, mrloss also at two more chunk sizes: the old rule's N H / V and twice
# the default (bench.roofline predicts each; the summary prints predicted against measured)
bench_args="--preset gpu-goals --impls torch-chunked,liger,cce,trl,mrloss-triton,mrloss-triton-low --warmup 1 \
--reps 3 --out-dir $out/bench"
declare -A OLD_RULE_CHUNK=([llama3-8b]=528 [gemma2-2b]=256)
# a ~100M-parameter Llama from a config (BPE tokenizer trained on the example data, which the built-in config
# writes to examples/sft/multi_region/data/ of the checkout), bf16, packed 1024-token rows
train_overrides="model.hidden_size=1024 model.num_layers=8 model.num_heads=16 model.num_kv_heads=4 \
model.intermediate_size=2816 model.vocab_size=8192 model.dtype=bfloat16 data.max_length=1024 data.pack=true \
trainer.output_dir=$out/train trainer.device=cuda \
trainer.max_steps=150 trainer.per_device_batch_size=8 trainer.learning_rate=3.0e-4 trainer.logging_steps=25 \
trainer.save_steps=null"

STAGES=(env setup pytest-gpu)
declare -A BUDGET=([env]=8 [setup]=15 [pytest-gpu]=50 [train]=35 [summary]=15)
declare -A COMMAND=(
  [env]="nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv && $PYTHON -c 'import sys, torch, \
triton; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
\"triton\", triton.__version__); assert torch.cuda.is_available(), \"no CUDA device\"; \
print(torch.cuda.get_device_name())' && du -sh --apparent-size $REPO"
  [setup]="{ ! compgen -G '$WHEELS/*.whl' >/dev/null || { rm -rf $SITE && $PYTHON -m pip install --quiet --no-index \
--no-deps --no-compile --no-cache-dir --target $SITE $WHEELS/*.whl && ls $SITE; }; } \
&& $PYTHON -m bench.wheel_list --check-imports"
  [pytest-gpu]="$PYTHON -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
--junitxml=$out/pytest-gpu.xml tests"
  [train]="$PYTHON -m mrloss train --config tag_based $train_overrides"
  [summary]="$PYTHON -m bench.gpu_summary $out"
)
for head in llama3-8b gemma2-2b; do
  for zero_frac in 0 0.5 0.9; do
    stage="bench-$head-z$zero_frac"
    STAGES+=("$stage")
    BUDGET[$stage]=44
    COMMAND[$stage]="$PYTHON -m bench.linear_ce $bench_args --heads $head --zero-fracs $zero_frac \
--chunk-sizes ${OLD_RULE_CHUNK[$head]},4096 --name gpu-goals-$head-z$zero_frac"
  done
done
STAGES+=(train summary)
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"

total=0
for stage in "${STAGES[@]}"; do total=$((total + BUDGET[$stage])); done
worst=$((total + KILL_GRACE_S * ${#STAGES[@]}))

# why a stage does not run ("" if it does)
skip_reason() {
  case "$1" in
    env|setup|summary) ;;
    *) [ "${status[env]:-}" = ok ] || echo "stage env did not pass (no CUDA device or no torch)" ;;
  esac
}

if [ "$dry_run" = 1 ]; then
  echo "gpu_pass dry run: OUTDIR=$out PACK=${pack:-none} WHEELS=$WHEELS SITE=$SITE PYTHON=$PYTHON (cwd $REPO, PYTHONPATH=$PYTHONPATH)"
  for stage in "${STAGES[@]}"; do
    printf 'stage %-22s budget %4d s: %s\n' "$stage" "${BUDGET[$stage]}" "${COMMAND[$stage]}"
  done
  echo "total budget: $total s; with ${KILL_GRACE_S} s kill grace per stage at most $worst s (limit $LIMIT_S s)"
  exit 0
fi

cd "$REPO" || exit 2
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
if [ -n "$pack" ]; then
  mkdir -p "$pack" && tar czf "$pack/gpu-pass.tgz" -C "$out" . \
    && for file in summary.md summary.json stages.tsv gpu_pass.log; do [ ! -f "$out/$file" ] || cp "$out/$file" "$pack/"; done
  echo "packed into $pack: $(ls "$pack" | tr '\n' ' ')"
fi
exit $failed
