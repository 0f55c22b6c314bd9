#!/usr/bin/env bash
# `make demo`'s SmolLM2 stage: the SmolLM2 recipe (configs/longmem_smollm2.sh: memory from backbone layer 18, the
# gates' group, k, chunk size, the long-range mix) cut to fit the demo's time on 2 CPU cores:
#
#   bash configs/longmem_smollm2_demo.sh [OUT=smollm2_demo_out]
#
# Fewer updates (over fewer training documents, as many as the updates read), and the evaluate stage on the
# held-out long-range set and real text only. Sourced as a preset (by train_longmem.sh, or by the recipe through
# SMOLLM2_PRESET), it gives the recipe's values with the lines below in place of its own.
# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/longmem_smollm2.sh"
MAX_UPDATE=600
SAVE_INTERVAL_UPDATES=300
# 600 updates x 2 rows x 256 tokens = 307,200 tokens: 150 documents of 2,048 tokens
TRAIN_DOCS=160
EVAL_SETS="longrange real"

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  SMOLLM2_PRESET=$HERE/$(basename "${BASH_SOURCE[0]}") exec bash "$HERE/longmem_smollm2.sh" "${1:-$HERE/../smollm2_demo_out}"
fi
