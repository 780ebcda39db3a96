#!/usr/bin/env bash
# The paper's ablations of POPO: one full run per ablation on top of any POPO script, each named
# <base experiment>_ablate-<name>.
#   bash scripts/ablate.sh NAME|all [hydra overrides]          (--cfg job prints each config, launches nothing)
#   SCRIPT=scripts/run_popo_qwen1.5b.sh bash scripts/ablate.sh uniform
#   MODEL=r1-distill SIZE=1.5b PRESET=verl bash scripts/ablate.sh all
set -euo pipefail
NAMES=(uniform alpha0 beta0 frozen-siamese no-predictor kl-anchor noise0)
override_of() {
  case "$1" in
    uniform)        echo algorithm.popo.weight_mode=uniform ;;    # 1/|S+| in place of the softmax weights
    alpha0)         echo algorithm.popo.alpha=0 ;;                # no similarity penalty
    beta0)          echo algorithm.popo.beta=0 ;;                 # no entropy bonus
    frozen-siamese) echo algorithm.popo.tau=1.0 ;;                # the siamese never moves: a frozen reference
    no-predictor)   echo algorithm.popo.predictor_layers=0 ;;     # identity head in place of the predictor MLP
    kl-anchor)      echo algorithm.popo.anchor=kl ;;              # k3 KL to the siamese in place of the cosine penalty
    noise0)         echo algorithm.popo.feature_noise_std=0 ;;    # no noise on the siamese's features
    *) return 1 ;;
  esac
}
if [[ $# -lt 1 ]]; then echo "usage: bash scripts/ablate.sh {${NAMES[*]}|all} [hydra overrides]" >&2; exit 2; fi
which=$1
shift
selected=("$which")
[[ "$which" == all ]] && selected=("${NAMES[@]}")
source "$(dirname "${BASH_SOURCE[0]}")/variants.sh"
for name in "${selected[@]}"; do
  override=$(override_of "$name") || { echo "unknown ablation '$name'; known: ${NAMES[*]} all" >&2; exit 2; }
  run_variant "ablate-$name" "$override" "$@"
done
