#!/usr/bin/env bash
# The first command to run on a GPU machine: the suite's GPU-relevant tests, then POPO and GRPO for a few steps on
# the tiny task through scripts/run_tiny_cpu.sh with GPU settings (CUDA, bf16 actor and reference, the hf rollout
# on the GPU or vLLM where it imports), then a compact report: pass/fail per stage, per-phase POPO/GRPO ratios
# (median over the steps after the first), peak actor/perf/max_memory_allocated_gb.
#   bash scripts/gpu_check.sh                          # FSDP2 engine
#   bash scripts/gpu_check.sh megatron                 # verl's Megatron engine (pip install -e ".[megatron]")
#   ROLLOUT=hf STEPS=8 bash scripts/gpu_check.sh trainer.n_gpus_per_node=1   # hydra overrides go to both runs
#   ALGOS= bash scripts/gpu_check.sh                   # the tests alone (minutes), e.g. on a short GPU loan
# Exit status: 0 every stage passed, 1 a stage failed, 2 no usable GPU (or a missing requirement), said in one line.
# Everything lands in OUT_DIR (tests.log, popo.log, grpo.log, each run's console, report.txt, report.json).
set -euo pipefail

ENGINE=fsdp2
if [[ $# -gt 0 && "$1" != *=* ]]; then
  case "$1" in
    fsdp2|megatron) ENGINE=$1; shift ;;
    *) echo "gpu_check: unknown engine '$1' (known: fsdp2 megatron); hydra overrides are KEY=VALUE" >&2; exit 2 ;;
  esac
fi
STEPS=${STEPS:-5}                              # training steps per algorithm (the first is warm-up, not measured)
ROLLOUT=${ROLLOUT:-auto}                       # hf, vllm, or auto: vllm where `import vllm` works, else hf
# the suite's GPU-relevant tests (TESTS= skips them; tests/test_gpu_rollout.py holds the CUDA ones, the two-process
# CUDA-IPC weight sync among them). Not tests/test_megatron_engine.py: it runs megatron-core on the CPU stand-in
# (popo_verl/engines/mcore_cpu.py), which refuses a machine with a GPU; here the Megatron engine is checked through
# the runs below.
TESTS=${TESTS-tests/test_gpu_rollout.py tests/test_engine.py tests/test_lora.py tests/test_cpu_backend.py tests/test_plugin.py}
ALGOS=${ALGOS-popo grpo}                       # the runs after the tests (ALGOS= none)
OUT_DIR=${OUT_DIR:-$PWD/runs/gpu_check_${ENGINE}_$(date +%Y%m%d_%H%M%S)}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# ---------------------------------------------------------------------------------------------- requirements
# No GPU: one line and exit 2, in seconds (nvidia-smi first; torch is imported only where it answers).
if [[ "$ENGINE" == megatron ]]; then
  if ! python -c "import megatron.core" >/dev/null 2>&1; then
    echo "gpu_check: megatron-core is not installed: pip install -e \".[megatron]\" (or run without 'megatron')" >&2
    exit 2
  fi
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no GPU: nvidia-smi not found (this script is for a CUDA machine; on the CPU run scripts/run_tiny_cpu.sh)" >&2
  exit 2
fi
GPU=$(python -m popo_verl.bench.gpu_check device) || exit 2
if [[ "$ROLLOUT" == auto ]]; then
  if python -c "import vllm" >/dev/null 2>&1; then ROLLOUT=vllm; else ROLLOUT=hf; fi
fi
GPU_ARGS_TEXT=$(python -m popo_verl.bench.gpu_check overrides --rollout "$ROLLOUT" --engine "$ENGINE")
mapfile -t GPU_ARGS <<< "$GPU_ARGS_TEXT"
mkdir -p "$OUT_DIR"
echo "gpu_check: $GPU; engine $ENGINE; rollout $ROLLOUT; $STEPS steps per algorithm; output in $OUT_DIR"

# ---------------------------------------------------------------------------------------------- 1. tests
STAGES=()
if [[ -n "$TESTS" ]]; then
  echo "gpu_check: tests: $TESTS"
  tests_rc=0
  # -rs: a CUDA test that skipped says why in the log (it should not skip here)
  # shellcheck disable=SC2086  # TESTS is a list of paths
  (cd "$ROOT" && python -m pytest -q -rs -p no:cacheprovider $TESTS) > "$OUT_DIR/tests.log" 2>&1 || tests_rc=$?
  tail -n 1 "$OUT_DIR/tests.log"
  STAGES+=(--stage "tests=$tests_rc")
fi

# ---------------------------------------------------------------------------------------------- 2. POPO and GRPO
run_algo() {
  local algo=$1; shift
  echo "gpu_check: $algo, $STEPS steps ..."
  local rc=0
  # ROLLOUT picks run_tiny_cpu.sh's rollout block (vllm: the head_dim-32 tiny model); PYTHON: this machine's
  # python, not the CPU vLLM venv that ROLLOUT=vllm looks for by default
  ALGO=$algo ENGINE=$ENGINE ROLLOUT=$ROLLOUT PYTHON=${PYTHON:-python} TOTAL_STEPS=$STEPS TEST_FREQ=-1 SAVE_FREQ=-1 POPO_VERL_CPU=0 \
    RUN_DIR="$OUT_DIR/$algo" LOG_FILE="$OUT_DIR/$algo.log" CKPT_DIR="$OUT_DIR/ckpt_$algo" \
    bash "$ROOT/scripts/run_tiny_cpu.sh" trainer.val_before_train=false trainer.resume_mode=disable \
    "${GPU_ARGS[@]}" "$@" > "$OUT_DIR/$algo.console" 2>&1 || rc=$?
  [[ $rc == 0 ]] || tail -n 20 "$OUT_DIR/$algo.console" >&2
  return $rc
}
for algo in $ALGOS; do
  rc=0; run_algo "$algo" "$@" || rc=$?
  STAGES+=(--stage "$algo=$rc")
done

# ---------------------------------------------------------------------------------------------- 3. report
report_rc=0
python -m popo_verl.bench.gpu_check report --header "$GPU; engine $ENGINE; rollout $ROLLOUT" \
  "${STAGES[@]}" \
  --popo "$OUT_DIR/popo.log" --grpo "$OUT_DIR/grpo.log" --json "$OUT_DIR/report.json" \
  > "$OUT_DIR/report.txt" || report_rc=$?
cat "$OUT_DIR/report.txt"
exit "$report_rc"
