#!/usr/bin/env bash
# Shared by run_multi_region_{position,tag,structured}.sh; not meant to be called directly.
#   launch.sh SCRIPT_NAME CONFIG NPROC SAVE_PATH [--engine hf|verl] [key.sub=value ...]
# hf (default): torchrun --nproc_per_node=NPROC -m mrloss.cli train --config CONFIG trainer.output_dir=SAVE_PATH ...
# verl:         python -m mrloss.integrations.verl --nproc NPROC --config CONFIG --save-path SAVE_PATH ...
# Runs from the repository root (config paths and relative overrides resolve there); SAVE_PATH is taken
# relative to the directory you call from. Env: TORCHRUN (default torchrun), TORCHRUN_ARGS (default --standalone).
set -euo pipefail
script=$1 config=$2
shift 2
if [ $# -lt 2 ]; then
    echo "usage: bash $script NPROC SAVE_PATH [--engine hf|verl] [key.sub=value ...]" >&2
    exit 2
fi
nproc=$1 save_path=$2
shift 2
case $save_path in /*) ;; *) save_path="$PWD/$save_path" ;; esac
engine=hf
if [ "${1:-}" = "--engine" ]; then
    engine=${2:?"--engine needs a value: hf or verl"}
    shift 2
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
case $engine in
    hf)
        # shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of options
        exec "${TORCHRUN:-torchrun}" ${TORCHRUN_ARGS:---standalone} --nproc_per_node="$nproc" \
            -m mrloss.cli train --config "$config" trainer.output_dir="$save_path" "$@" ;;
    verl)
        exec python -m mrloss.integrations.verl --nproc "$nproc" --config "$config" --save-path "$save_path" "$@" ;;
    *)
        echo "$script: unknown engine '$engine' (hf or verl)" >&2
        exit 2 ;;
esac
