#!/usr/bin/env bash
# Multi-region SFT on the structured example data (mrloss/configs/multi_region_structured.yaml).
# usage: bash examples/sft/multi_region/run_multi_region_structured.sh NPROC SAVE_PATH [--engine hf|verl] [key.sub=value ...]
#   e.g. bash examples/sft/multi_region/run_multi_region_structured.sh 2 ./outputs trainer.max_steps=20
exec bash "$(dirname "${BASH_SOURCE[0]}")/launch.sh" "$0" structured "$@"
