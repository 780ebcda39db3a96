# Shared by scripts/run_popo.sh and scripts/run_grpo.sh: everything but the algorithm, so that POPO and its GRPO
# twin see the same model, prompts, data, rollout, lengths, batch, steps, optimizer and validation.
# Sourced, not run. The caller sets ALGO_TAG (used in the experiment name), then calls `launch ALGO_ARGS... -- "$@"`.
#
#   MODEL    qwen2.5-math (SIZE 1.5b|7b), r1-distill (1.5b|7b), llama3.1-instruct (8b), deepseek-math (7b)
#   PRESET   paper: the reference implementation's budget (REF below); verl: a verl-style budget (128 prompts per
#            rollout batch, 2 optimizer steps each, 500 steps)
# Every value below can be overridden from the environment (e.g. LR=5e-7), and any hydra override can follow the
# script name. REF = the POPO authors' reference code (github.com/momo1443/colm2026-POPO: its README's 7B command,
# configs/, scripts/train_popo.py defaults); where it is silent the comment says so.

MODEL=${MODEL:-qwen2.5-math}
SIZE=${SIZE:-7b}
PRESET=${PRESET:-paper}

case "$MODEL/$SIZE" in
  qwen2.5-math/1.5b)    hub_id=Qwen/Qwen2.5-Math-1.5B;                    template=qwen_math ;;
  qwen2.5-math/7b)      hub_id=Qwen/Qwen2.5-Math-7B;                      template=qwen_math ;;
  r1-distill/1.5b)      hub_id=deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B; template=r1 ;;
  r1-distill/7b)        hub_id=deepseek-ai/DeepSeek-R1-Distill-Qwen-7B;   template=r1 ;;
  llama3.1-instruct/8b) hub_id=meta-llama/Llama-3.1-8B-Instruct;          template=llama ;;
  deepseek-math/7b)     hub_id=deepseek-ai/deepseek-math-7b-base;         template=deepseek ;;
  *) echo "unknown MODEL/SIZE '$MODEL/$SIZE'; known: qwen2.5-math/{1.5b,7b} r1-distill/{1.5b,7b}" \
          "llama3.1-instruct/8b deepseek-math/7b" >&2; exit 2 ;;
esac
MODEL_PATH=${MODEL_PATH:-$hub_id}
# The reference's hand-written prompt layout per family (popo_verl/templates.py); `tokenizer` keeps the model's own.
CHAT_TEMPLATE=${CHAT_TEMPLATE:-$template}

# Models of 7B and up take the reference's 7B command; the 1.5B ones its default config.
large=true
[[ "$SIZE" == 1.5b ]] && large=false

# The learning rate and POPO's knobs follow the model's size, in both presets (the GRPO twin reads the LR only).
ALPHA=${ALPHA:-0.1}                                   # REF configs/popo/default.yaml and the 7B command
BETA=${BETA:-0.01}                                    # REF configs/popo/default.yaml (beta_entropy) and the 7B command
if [[ "$large" == true ]]; then
  LR=${LR:-1e-7}                                      # REF 7B command (--learning_rate 1e-7)
  TAU=${TAU:-0.999}                                   # REF 7B command
  FEATURE_NOISE=${FEATURE_NOISE:-0.01}                # REF 7B command
  PREDICTOR_DIM=${PREDICTOR_DIM:-4096}                # REF 7B command
else
  LR=${LR:-1e-6}                                      # REF configs/trainer/default.yaml
  TAU=${TAU:-0.995}                                   # REF configs/popo/default.yaml
  FEATURE_NOISE=${FEATURE_NOISE:-0.02}                # REF configs/popo/default.yaml
  PREDICTOR_DIM=${PREDICTOR_DIM:-1024}                # REF configs/popo/default.yaml
fi

# R1-distilled models reason at length (1024 tokens cut most of their answers off), whatever the preset.
if [[ "$MODEL" == r1-distill ]]; then
  RESPONSE_LENGTH=${RESPONSE_LENGTH:-4096}            # not in REF (no R1 command): its evaluation's max_tokens
fi
case "$PRESET" in
  paper)
    TRAIN_BATCH=${TRAIN_BATCH:-8}                     # REF: 8 prompts x 8 responses per optimizer step (7B: 2 per GPU x 8 accumulation x 4 GPUs; 1.5B: 4 x 4 x 4)
    PPO_MINI_BATCH=${PPO_MINI_BATCH:-$TRAIN_BATCH}    # REF: one optimizer step per rollout batch (TRL num_iterations 1)
    if [[ "$large" == true ]]; then
      TOTAL_STEPS=${TOTAL_STEPS:-1500}                # REF 7B command (--max_steps 1500)
      WARMUP_STEPS=${WARMUP_STEPS:-150}               # REF warmup_ratio 0.1 of 1500 optimizer steps
      RESPONSE_LENGTH=${RESPONSE_LENGTH:-1024}        # REF 7B command (--max_completion_length 1024)
      SAVE_FREQ=${SAVE_FREQ:-500}                     # REF 7B command (--save_steps 500)
    else
      TOTAL_STEPS=${TOTAL_STEPS:-1000}                # REF scripts/train_popo.py --max_steps default (no 1.5B command is given)
      WARMUP_STEPS=${WARMUP_STEPS:-100}               # REF warmup_ratio 0.1 of 1000 optimizer steps
      RESPONSE_LENGTH=${RESPONSE_LENGTH:-512}         # REF configs/popo/default.yaml (max_completion_length)
      SAVE_FREQ=${SAVE_FREQ:-1000}                    # REF configs/trainer/default.yaml (save_steps)
    fi
    TEST_FREQ=${TEST_FREQ:-100}                       # ours: the reference does not validate while training
    VAL_TEMPERATURE=${VAL_TEMPERATURE:-0.7}           # REF scripts/evaluate.py (--temperature 0.7)
    ;;
  verl)
    TRAIN_BATCH=${TRAIN_BATCH:-128}                   # ours, verl-style: large rollout batches
    PPO_MINI_BATCH=${PPO_MINI_BATCH:-64}              # ours, verl-style: 2 optimizer steps per rollout batch
    TOTAL_STEPS=${TOTAL_STEPS:-500}                   # ours: 64k prompts, about 1.6 epochs of DeepScaleR
    WARMUP_STEPS=${WARMUP_STEPS:--1}                  # -1: verl derives it from lr_warmup_steps_ratio (10 %, POPO.md)
    RESPONSE_LENGTH=${RESPONSE_LENGTH:-1024}          # POPO.md (response 1024 for 7B, DeepScaleR data)
    SAVE_FREQ=${SAVE_FREQ:-50}                        # ours
    TEST_FREQ=${TEST_FREQ:-20}                        # ours
    VAL_TEMPERATURE=${VAL_TEMPERATURE:-0.6}           # ours: the sampling temperature DeepScaleR evaluates at
    ;;
  *) echo "unknown PRESET '$PRESET'; known: paper verl" >&2; exit 2 ;;
esac
PROMPT_LENGTH=${PROMPT_LENGTH:-512}                   # REF (max_prompt_length 512) and POPO.md

DATA_DIR=${DATA_DIR:-$HOME/data/popo}
TRAIN_SET=${TRAIN_SET:-deepscaler}                    # deepscaler (REF, POPO.md), gsm8k_train (the paper's Figure 1), math_train
VAL_SETS=${VAL_SETS:-math500 aime24 aime25 amc23 olympiadbench}
NNODES=${NNODES:-1}
N_GPUS_PER_NODE=${N_GPUS_PER_NODE:-8}
ROLLOUT_TP=${ROLLOUT_TP:-2}
PROJECT_NAME=${PROJECT_NAME:-popo_verl}
# ablate.sh / sweep.sh set EXPERIMENT_SUFFIX, so that their runs sit next to the base run in the tracker
EXPERIMENT_NAME=${EXPERIMENT_NAME:-${ALGO_TAG}_${MODEL}-${SIZE}_${PRESET}}${EXPERIMENT_SUFFIX:+_$EXPERIMENT_SUFFIX}
CKPT_DIR=${CKPT_DIR:-$PWD/checkpoints/${PROJECT_NAME}/${EXPERIMENT_NAME}}
LOGGER=${LOGGER:-[console,wandb]}
# after each step the trainer asks the Ray head (its GCS); without an answer in this many seconds it saves a
# checkpoint and ends the run, before Ray's own 60 s timeout takes every process down mid-step (popo_verl/stop.py);
# exported for the driver, whose polls of the GCS then pause while it is gone (popo_verl/ray_head.py)
export POPO_RAY_HEAD_TIMEOUT_S=${POPO_RAY_HEAD_TIMEOUT_S:-10}

compose_only=false
for arg in "$@"; do [[ "$arg" == "--cfg" || "$arg" == "--help" || "$arg" == "-h" ]] && compose_only=true; done

train_file="$DATA_DIR/train.parquet"
[[ "$TRAIN_SET" == deepscaler ]] || train_file="$DATA_DIR/$TRAIN_SET.parquet"
val_files=()
for name in $VAL_SETS; do val_files+=("$DATA_DIR/$name.parquet"); done
if [[ "$compose_only" == false ]]; then
  for f in "$train_file" "${val_files[@]}"; do
    if [[ ! -f "$f" ]]; then
      echo "missing $f" >&2
      echo "prepare the data first:  python -m popo_verl.data prepare --out $DATA_DIR" >&2
      exit 1
    fi
  done
  # fails in seconds, naming the cause, where verl would fail minutes later inside a worker
  python -m popo_verl.preflight --gpus "$N_GPUS_PER_NODE" --model "$MODEL_PATH"
fi
VAL_LIST="[$(IFS=,; echo "${val_files[*]}")]"
REWARD_FILE=$(python -c "import popo_verl.reward as r; print(r.__file__)")
TEMPLATE_ARGS=()
[[ "$CHAT_TEMPLATE" == tokenizer ]] || TEMPLATE_ARGS=("$(python -m popo_verl.templates "$CHAT_TEMPLATE")")

DATA_ARGS=(
  data.train_files="$train_file"
  data.val_files="$VAL_LIST"
  data.train_batch_size="$TRAIN_BATCH"
  data.max_prompt_length="$PROMPT_LENGTH"
  data.max_response_length="$RESPONSE_LENGTH"
  data.filter_overlong_prompts=true
  data.truncation=error
  reward.custom_reward_function.path="$REWARD_FILE"
  reward.custom_reward_function.name=compute_score
)
# ENGINE: fsdp2 (default) or megatron (verl's Megatron engine; pip install -e ".[megatron]"). Megatron's TP/PP
# default to those of verl's own Megatron GRPO examples on 8 GPUs (examples/grpo_trainer/run_qwen2-7b_math_megatron.sh:
# TP 2, PP 2 for 7B; 1.5B fits TP 1, PP 1). VANILLA_MBRIDGE=true (the default below Python 3.12) uses mbridge: verl's
# default bridge, Megatron-Bridge 0.5.2, needs Python 3.12.
ENGINE=${ENGINE:-fsdp2}
case "$ENGINE" in
  fsdp2)
    ENGINE_ARGS=(actor_rollout_ref.actor.strategy=fsdp2 actor_rollout_ref.ref.strategy=fsdp2)
    PRECISION_ARGS=(actor_rollout_ref.actor.fsdp_config.dtype=bfloat16
                    actor_rollout_ref.actor.optim.lr_scheduler_type=cosine) ;;
  megatron)
    if [[ "$large" == true ]]; then MEGATRON_TP=${MEGATRON_TP:-2}; MEGATRON_PP=${MEGATRON_PP:-2}
    else MEGATRON_TP=${MEGATRON_TP:-1}; MEGATRON_PP=${MEGATRON_PP:-1}; fi
    MEGATRON_CP=${MEGATRON_CP:-1}   # context parallelism: for long responses (each sequence split over CP ranks)
    if python -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then VANILLA_MBRIDGE=${VANILLA_MBRIDGE:-false}
    else VANILLA_MBRIDGE=${VANILLA_MBRIDGE:-true}; fi
    ENGINE_ARGS=(
      model_engine=megatron
      actor_rollout_ref.actor.megatron.tensor_model_parallel_size="$MEGATRON_TP"
      actor_rollout_ref.actor.megatron.pipeline_model_parallel_size="$MEGATRON_PP"
      actor_rollout_ref.ref.megatron.tensor_model_parallel_size="$MEGATRON_TP"   # the siamese: the actor's layout
      actor_rollout_ref.ref.megatron.pipeline_model_parallel_size="$MEGATRON_PP"
      actor_rollout_ref.actor.megatron.context_parallel_size="$MEGATRON_CP"
      actor_rollout_ref.ref.megatron.context_parallel_size="$MEGATRON_CP"
      actor_rollout_ref.actor.megatron.vanilla_mbridge="$VANILLA_MBRIDGE"
      actor_rollout_ref.ref.megatron.vanilla_mbridge="$VANILLA_MBRIDGE"
    )
    PRECISION_ARGS=(actor_rollout_ref.actor.megatron.dtype=bfloat16
                    actor_rollout_ref.actor.optim.lr_decay_style=cosine) ;;  # Megatron's name for the schedule
  *) echo "unknown ENGINE '$ENGINE'; known: fsdp2 megatron" >&2; exit 2 ;;
esac
MODEL_ARGS=(
  actor_rollout_ref.model.path="$MODEL_PATH"
  "${TEMPLATE_ARGS[@]}"
  actor_rollout_ref.model.use_remove_padding=true
  actor_rollout_ref.model.enable_gradient_checkpointing=true
  "${ENGINE_ARGS[@]}"
  actor_rollout_ref.actor.ppo_mini_batch_size="$PPO_MINI_BATCH"
  actor_rollout_ref.actor.use_dynamic_bsz=true
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=$(( (PROMPT_LENGTH + RESPONSE_LENGTH) * 4 ))
  actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=$(( (PROMPT_LENGTH + RESPONSE_LENGTH) * 8 ))
  actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=$(( (PROMPT_LENGTH + RESPONSE_LENGTH) * 8 ))
)
OPTIM_ARGS=(
  actor_rollout_ref.actor.optim.lr="$LR"
  actor_rollout_ref.actor.optim.lr_warmup_steps="$WARMUP_STEPS"
  actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.1  # REF warmup_ratio, POPO.md (used when lr_warmup_steps < 0)
  actor_rollout_ref.actor.optim.weight_decay=0.01          # REF configs/trainer/default.yaml, POPO.md
  actor_rollout_ref.actor.optim.clip_grad=1.0              # REF max_grad_norm, POPO.md
  "${PRECISION_ARGS[@]}"                                   # REF bf16 and cosine schedule (configs/trainer/default.yaml), POPO.md
)
ROLLOUT_ARGS=(
  actor_rollout_ref.rollout.name=vllm
  actor_rollout_ref.rollout.n=8                            # REF num_generations, POPO.md
  actor_rollout_ref.rollout.temperature=1.0                # REF configs/popo/default.yaml, POPO.md
  actor_rollout_ref.rollout.tensor_model_parallel_size="$ROLLOUT_TP"
  actor_rollout_ref.rollout.gpu_memory_utilization=0.6
  actor_rollout_ref.rollout.calculate_log_probs=true
  actor_rollout_ref.rollout.val_kwargs.do_sample=true
  actor_rollout_ref.rollout.val_kwargs.temperature="$VAL_TEMPERATURE"
  actor_rollout_ref.rollout.val_kwargs.top_p=0.95          # REF src/evaluation/evaluator.py top_p
  actor_rollout_ref.rollout.val_kwargs.n=16                # ours: avg@16 keeps validation affordable
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
  +ray_kwargs.ray_init.runtime_env.env_vars.POPO_RAY_HEAD_TIMEOUT_S="'$POPO_RAY_HEAD_TIMEOUT_S'"  # a string, for Ray
)

# launch ALGO_ARG... -- USER_OVERRIDE...: the user's overrides come last, so they win.
launch() {
  local algo=()
  while [[ $# -gt 0 && "$1" != -- ]]; do algo+=("$1"); shift; done
  [[ $# -gt 0 ]] && shift
  python -m verl.trainer.main_ppo \
    "${algo[@]}" \
    "${DATA_ARGS[@]}" \
    "${MODEL_ARGS[@]}" \
    "${OPTIM_ARGS[@]}" \
    "${ROLLOUT_ARGS[@]}" \
    "${TRAINER_ARGS[@]}" \
    "$@"
}
