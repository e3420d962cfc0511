#!/usr/bin/env bash
# Multi-region SFT on the position_based example data (mrloss/configs/multi_region_position_based.yaml).
# usage: bash examples/sft/multi_region/run_multi_region_position.sh NPROC SAVE_PATH [--engine hf|verl] [key.sub=value ...]
#   e.g. bash examples/sft/multi_region/run_multi_region_position.sh 2 ./outputs trainer.max_steps=20
exec bash "$(dirname "${BASH_SOURCE[0]}")/launch.sh" "$0" position_based "$@"
