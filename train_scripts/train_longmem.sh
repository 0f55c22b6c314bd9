#!/usr/bin/env bash
# Memory-augmented adaptation: a frozen newgpt backbone + trainable SideNet, with fairseq-train.
#
#   bash train_scripts/train_longmem.sh DATA_BIN BACKBONE_CHECKPOINT SAVE_DIR [extra fairseq-train flags...]
#
# Hyper-parameters come from a preset (default configs/longmem_tiny.sh; the released recipe is
# PRESET=configs/longmem_paper.sh). Flags after SAVE_DIR go to fairseq-train and win over the preset's
# values; the preset's switches (EXTRA_FLAGS) are replaced by EXTRA_FLAGS set in the environment.
# With no arguments: the embedded CPU default. It reuses `make demo`'s corpus and tiny backbone
# (building and pretraining them first when missing) and adapts into demo_out/longmem.
# Re-running resumes from SAVE_DIR/checkpoint_last.pt. DRY_RUN=1 prints the fairseq-train command instead.
#
# Several processes (python -m longmem.launch): NPROC=N processes on this node (CPU: gloo, one rank per
# process; GPUs: one per GPU, NCCL), and for several nodes NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
# (the same on every node). Each rank reads its own batch rows with its own memory.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# the project venv (make install) when there is one, else the python on PATH
if [[ -z ${PYTHON:-} ]]; then PYTHON=python; [[ -x $ROOT/.venv/bin/python ]] && PYTHON=$ROOT/.venv/bin/python; fi
PRESET=${PRESET:-$ROOT/configs/longmem_tiny.sh}
if [[ $# -eq 0 ]]; then
  "$PYTHON" -m longmem.demo --out "$ROOT/demo_out" --until backbone
  set -- "$ROOT/demo_out/data-bin-longrange" "$ROOT/demo_out/backbone/checkpoint_last.pt" "$ROOT/demo_out/longmem"
fi
[[ $# -ge 3 ]] || { echo "usage: $0 DATA_BIN BACKBONE_CHECKPOINT SAVE_DIR [fairseq-train flags]" >&2; exit 2; }
DATA=$1; BACKBONE=$2; SAVE=$3; shift 3
[[ -f $PRESET ]] || { echo "preset $PRESET not found (see configs/)" >&2; exit 2; }
[[ -f $DATA/dict.txt ]] || { echo "no fairseq data at $DATA (dict.txt missing)" >&2; exit 2; }
[[ -e $BACKBONE ]] || { echo "backbone checkpoint $BACKBONE not found (train one: train_scripts/pretrain_backbone.sh)" >&2; exit 2; }
# EXTRA_FLAGS in the environment replaces the preset's (e.g. EXTRA_FLAGS="" to drop its --cpu)
ENV_EXTRA_FLAGS=${EXTRA_FLAGS-__unset__}
# shellcheck disable=SC1090
source "$PRESET"
# a preset that changes another names it (PARENT=a path, relative to the preset's folder): the parent's lines, then
# the preset's again
if [[ -n ${PARENT:-} ]]; then
  if [[ $PARENT == /* ]]; then PARENT_FILE=$PARENT; else PARENT_FILE=$(dirname "$PRESET")/$PARENT; fi
  [[ -f $PARENT_FILE ]] || { echo "preset $PRESET: PARENT $PARENT_FILE not found" >&2; exit 2; }
  # shellcheck disable=SC1090
  source "$PARENT_FILE"
  # shellcheck disable=SC1090
  source "$PRESET"
fi
[[ $ENV_EXTRA_FLAGS == __unset__ ]] || EXTRA_FLAGS=$ENV_EXTRA_FLAGS
LOG_FORMAT=${LOG_FORMAT:-$([[ -t 1 ]] && echo tqdm || echo simple)}

# shellcheck disable=SC2086
CMD=("$PYTHON" -m fairseq_cli.train "$DATA" \
  --user-dir "$ROOT/longmem" --task "$TASK" --arch "$ARCH" --pretrained-model-path "$BACKBONE" \
  --reload-ptm-layer --use-external-memory --memory-size "$MEMORY_SIZE" --k "$K" --chunk-size "$CHUNK_SIZE" \
  --retrieval-layer-index "$RETRIEVAL_LAYER_INDEX" --layer-reduction-factor "$LAYER_REDUCTION_FACTOR" \
  --sample-break-mode none --tokens-per-sample "$TOKENS_PER_SAMPLE" --batch-size "$BATCH_SIZE" \
  --update-freq "$UPDATE_FREQ" --dropout "$DROPOUT" --attention-dropout "$ATTENTION_DROPOUT" \
  --optimizer adam --adam-betas '(0.9, 0.98)' --adam-eps 1e-6 --weight-decay "$WEIGHT_DECAY" \
  --lr "$LR" --lr-scheduler polynomial_decay --warmup-updates "$WARMUP_UPDATES" \
  --total-num-update "$MAX_UPDATE" --max-update "$MAX_UPDATE" \
  --save-dir "$SAVE" --no-epoch-checkpoints --save-interval-updates "${SAVE_INTERVAL_UPDATES:-500}" --keep-interval-updates 1 \
  --log-format "$LOG_FORMAT" --log-interval 10 --seed "$SEED" --num-workers 0 $EXTRA_FLAGS "$@")
NPROC=${NPROC:-1}; NNODES=${NNODES:-1}
if (( NPROC > 1 || NNODES > 1 )); then
  CMD=("$PYTHON" -m longmem.launch --nproc "$NPROC" --nnodes "$NNODES" --node-rank "${NODE_RANK:-0}" \
       --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-0}" -- "${CMD[@]:3}")
fi
# DRY_RUN=1: print the command, NUL-separated, instead of running it (used by the tests)
if [[ -n ${DRY_RUN:-} ]]; then printf '%s\0' "${CMD[@]}"; exit 0; fi
exec "${CMD[@]}"
