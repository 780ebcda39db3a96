#!/usr/bin/env bash
# POPO on Qwen/Qwen2.5-Math-1.5B: scripts/run_popo.sh with MODEL=qwen2.5-math SIZE=1.5b.
# PRESET (paper | verl) and every other variable of scripts/common.sh still apply.
#   bash scripts/run_popo_qwen1.5b.sh [hydra overrides]     (--cfg job prints the config, launches nothing)
set -euo pipefail
MODEL=qwen2.5-math SIZE=1.5b exec bash "$(dirname "${BASH_SOURCE[0]}")/run_popo.sh" "$@"
