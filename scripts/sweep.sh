#!/usr/bin/env bash
# The paper's sensitivity sweeps of POPO: one full run per value of one knob on top of any POPO script, each named
# <base experiment>_sweep-<knob>-<value>.
#   bash scripts/sweep.sh alpha|beta|tau|noise [hydra overrides]   (--cfg job prints each config, launches nothing)
#   VALUES="0.1 0.3" SCRIPT=scripts/run_popo_qwen1.5b.sh bash scripts/sweep.sh alpha
set -euo pipefail
if [[ $# -lt 1 ]]; then echo "usage: bash scripts/sweep.sh {alpha|beta|tau|noise} [hydra overrides]" >&2; exit 2; fi
knob=$1
shift
case "$knob" in
  alpha) key=algorithm.popo.alpha;             grid="0.05 0.1 0.2 0.3" ;;     # POPO.md range 0.05-0.3
  beta)  key=algorithm.popo.beta;              grid="0.005 0.01 0.02 0.05" ;; # POPO.md range 0.005-0.05
  tau)   key=algorithm.popo.tau;               grid="0.99 0.995 0.999" ;;     # POPO.md range 0.99-0.999
  noise) key=algorithm.popo.feature_noise_std; grid="0 0.01 0.02 0.05" ;;     # POPO.md 0.02 (0.01 for 7B); 0, 0.05 ours
  *) echo "unknown knob '$knob'; known: alpha beta tau noise" >&2; exit 2 ;;
esac
VALUES=${VALUES:-$grid}
source "$(dirname "${BASH_SOURCE[0]}")/variants.sh"
for value in $VALUES; do
  run_variant "sweep-$knob-$value" "$key=$value" "$@"
done
