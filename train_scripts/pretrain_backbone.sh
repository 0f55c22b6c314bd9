#!/usr/bin/env bash
# Pretrain the newgpt backbone with the stock fairseq-train and --user-dir longmem.
#
#   bash train_scripts/pretrain_backbone.sh DATA_BIN SAVE_DIR [extra fairseq-train flags...]
#
# Hyper-parameters come from a preset in configs/ (default configs/backbone_tiny.sh; choose another
# with PRESET=path). Flags after SAVE_DIR are passed to fairseq-train and win over the preset's values;
# the preset's switches (EXTRA_FLAGS, e.g. --cpu) are replaced by EXTRA_FLAGS set in the environment.
# With no arguments: the demo's corpus (demo_out/data-bin, built by `make demo`) into
# demo_out/backbone. Re-running resumes from SAVE_DIR/checkpoint_last.pt.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# the project venv (make install) when there is one, else the python on PATH
if [[ -z ${PYTHON:-} ]]; then PYTHON=python; [[ -x $ROOT/.venv/bin/python ]] && PYTHON=$ROOT/.venv/bin/python; fi
PRESET=${PRESET:-$ROOT/configs/backbone_tiny.sh}
DATA=${1:-$ROOT/demo_out/data-bin}
SAVE=${2:-$ROOT/demo_out/backbone}
shift $(( $# < 2 ? $# : 2 ))

[[ -f $PRESET ]] || { echo "preset $PRESET not found (see configs/)" >&2; exit 2; }
[[ -f $DATA/dict.txt ]] || { echo "no fairseq data at $DATA (dict.txt missing): run fairseq-preprocess or 'make demo' first" >&2; exit 2; }
# EXTRA_FLAGS in the environment replaces the preset's (e.g. EXTRA_FLAGS="" to drop its --cpu)
ENV_EXTRA_FLAGS=${EXTRA_FLAGS-__unset__}
# shellcheck disable=SC1090
source "$PRESET"
[[ $ENV_EXTRA_FLAGS == __unset__ ]] || EXTRA_FLAGS=$ENV_EXTRA_FLAGS
LOG_FORMAT=${LOG_FORMAT:-$([[ -t 1 ]] && echo tqdm || echo simple)}

# shellcheck disable=SC2086
exec "$PYTHON" -m fairseq_cli.train "$DATA" \
  --user-dir "$ROOT/longmem" --task language_modeling --arch "$ARCH" \
  --sample-break-mode none --tokens-per-sample "$TOKENS_PER_SAMPLE" --batch-size "$BATCH_SIZE" \
  --dropout "$DROPOUT" --attention-dropout "$ATTENTION_DROPOUT" \
  --optimizer adam --adam-betas '(0.9, 0.98)' --adam-eps 1e-6 --weight-decay "$WEIGHT_DECAY" \
  --clip-norm "$CLIP_NORM" --lr "$LR" --lr-scheduler polynomial_decay --warmup-updates "$WARMUP_UPDATES" \
  --total-num-update "$MAX_UPDATE" --max-update "$MAX_UPDATE" \
  --save-dir "$SAVE" --no-epoch-checkpoints --save-interval-updates 100 \
  --keep-interval-updates 1 --validate-interval-updates 1000000 \
  --log-format "$LOG_FORMAT" --log-interval 10 --seed "$SEED" --num-workers 0 ${EXTRA_FLAGS:-} "$@"
