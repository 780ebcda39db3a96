# Shared by run_{popo,grpo}_qwen{7b,1.5b}.sh: everything but the algorithm, so POPO and GRPO are drop-in
# comparable (same model, data, rollout, lengths, batch, steps, validation, optimizer). Sourced, not run.
# Expects: MODEL_PATH, EXPERIMENT_NAME, RESPONSE_LENGTH, LR, ALGO_ARGS (array); the caller passes "$@".

DATA_DIR=${DATA_DIR:-$HOME/data/popo}
NNODES=${NNODES:-1}
N_GPUS_PER_NODE=${N_GPUS_PER_NODE:-8}
ROLLOUT_TP=${ROLLOUT_TP:-2}
PROJECT_NAME=${PROJECT_NAME:-popo_verl}
CKPT_DIR=${CKPT_DIR:-$PWD/checkpoints/${PROJECT_NAME}/${EXPERIMENT_NAME}}
LOGGER=${LOGGER:-[console,wandb]}
TRAIN_BATCH=${TRAIN_BATCH:-128}
PPO_MINI_BATCH=${PPO_MINI_BATCH:-64}
TOTAL_STEPS=${TOTAL_STEPS:-500}
TEST_FREQ=${TEST_FREQ:-20}
SAVE_FREQ=${SAVE_FREQ:-50}
PROMPT_LENGTH=${PROMPT_LENGTH:-512}
VAL_SETS=${VAL_SETS:-math500 aime24 aime25 amc23 olympiadbench}

compose_only=false
for arg in "$@"; do [[ "$arg" == "--cfg" || "$arg" == "--help" || "$arg" == "-h" ]] && compose_only=true; done

val_files=()
for name in $VAL_SETS; do val_files+=("$DATA_DIR/$name.parquet"); done
if [[ "$compose_only" == false ]]; then
  for f in "$DATA_DIR/train.parquet" "${val_files[@]}"; do
    if [[ ! -f "$f" ]]; then
      echo "missing $f" >&2
      echo "prepare the data first:  python -m popo_verl.data prepare --out $DATA_DIR" >&2
      exit 1
    fi
  done
fi
VAL_LIST="[$(IFS=,; echo "${val_files[*]}")]"
REWARD_FILE=$(python -c "import popo_verl.reward as r; print(r.__file__)")

DATA_ARGS=(
  data.train_files="$DATA_DIR/train.parquet"
  data.val_files="$VAL_LIST"
  data.train_batch_size="$TRAIN_BATCH"
  data.max_prompt_length="$PROMPT_LENGTH"
  data.max_response_length="$RESPONSE_LENGTH"
  data.filter_overlong_prompts=true
  data.truncation=error
  reward.custom_reward_function.path="$REWARD_FILE"
  reward.custom_reward_function.name=compute_score
)
MODEL_ARGS=(
  actor_rollout_ref.model.path="$MODEL_PATH"
  actor_rollout_ref.model.use_remove_padding=true
  actor_rollout_ref.model.enable_gradient_checkpointing=true
  actor_rollout_ref.actor.strategy=fsdp2
  actor_rollout_ref.ref.strategy=fsdp2
  actor_rollout_ref.actor.ppo_mini_batch_size="$PPO_MINI_BATCH"
  actor_rollout_ref.actor.use_dynamic_bsz=true
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=$(( (PROMPT_LENGTH + RESPONSE_LENGTH) * 4 ))
  actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=$(( (PROMPT_LENGTH + RESPONSE_LENGTH) * 8 ))
  actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=$(( (PROMPT_LENGTH + RESPONSE_LENGTH) * 8 ))
)
OPTIM_ARGS=(
  actor_rollout_ref.actor.optim.lr="$LR"
  actor_rollout_ref.actor.optim.lr_scheduler_type=cosine
  actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.1
  actor_rollout_ref.actor.optim.weight_decay=0.01
  actor_rollout_ref.actor.optim.clip_grad=1.0
  actor_rollout_ref.actor.fsdp_config.dtype=bfloat16
)
ROLLOUT_ARGS=(
  actor_rollout_ref.rollout.name=vllm
  actor_rollout_ref.rollout.n=8
  actor_rollout_ref.rollout.temperature=1.0
  actor_rollout_ref.rollout.tensor_model_parallel_size="$ROLLOUT_TP"
  actor_rollout_ref.rollout.gpu_memory_utilization=0.6
  actor_rollout_ref.rollout.calculate_log_probs=true
  actor_rollout_ref.rollout.val_kwargs.do_sample=true
  actor_rollout_ref.rollout.val_kwargs.temperature=0.6
  actor_rollout_ref.rollout.val_kwargs.top_p=0.95
  actor_rollout_ref.rollout.val_kwargs.n=16
)
TRAINER_ARGS=(
  trainer.nnodes="$NNODES"
  trainer.n_gpus_per_node="$N_GPUS_PER_NODE"
  trainer.total_training_steps="$TOTAL_STEPS"
  trainer.total_epochs=1000
  trainer.test_freq="$TEST_FREQ"
  trainer.save_freq="$SAVE_FREQ"
  trainer.val_before_train=true
  trainer.resume_mode=auto
  trainer.default_local_dir="$CKPT_DIR"
  trainer.project_name="$PROJECT_NAME"
  trainer.experiment_name="$EXPERIMENT_NAME"
  trainer.logger="$LOGGER"
)

python -m verl.trainer.main_ppo \
  "${ALGO_ARGS[@]}" \
  "${DATA_ARGS[@]}" \
  "${MODEL_ARGS[@]}" \
  "${OPTIM_ARGS[@]}" \
  "${ROLLOUT_ARGS[@]}" \
  "${TRAINER_ARGS[@]}" \
  "$@"
