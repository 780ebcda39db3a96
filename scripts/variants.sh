# Shared by ablate.sh and sweep.sh: runs one POPO script once per variant. Sourced, not run.
# Each run is named <the base run's experiment name>_<variant>, so that the runs sit next to the base run in the
# tracker and keep their own checkpoint directories.

SCRIPT=${SCRIPT:-$(dirname "${BASH_SOURCE[0]}")/run_popo.sh}   # any POPO run script (MODEL, SIZE, PRESET apply)
if [[ -n "${CKPT_DIR:-}" ]]; then
  # one directory for several runs would make each resume from the previous one's checkpoint
  echo "CKPT_DIR names a single run's directory; unset it (each variant gets checkpoints/PROJECT/EXPERIMENT)" >&2
  exit 2
fi

# run_variant NAME OVERRIDE [hydra overrides...]: the user's overrides come last, so they win.
run_variant() {
  local name=$1 override=$2
  shift 2
  echo "# variant $name: $override"
  EXPERIMENT_SUFFIX=$name bash "$SCRIPT" "$override" "$@"
}
