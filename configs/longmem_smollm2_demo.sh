# `make demo`'s SmolLM2 stage: the SmolLM2 recipe (its PARENT: memory from backbone layer 18, the gates' group, k,
# chunk size, the long-range mix) cut to fit the demo's time on 2 CPU cores:
#
#   longmem-recipe smollm2 OUT --preset configs/longmem_smollm2_demo.sh
#
# Fewer updates (over fewer training documents, as many as the updates read), and the evaluate stage on the
# held-out long-range set and real text only. KEY=VALUE lines only; PARENT's lines are read first, these win.
# Without the recipe's levers against forgetting (broad text, distillation): they add the broad corpus's build to
# the demo's time, and the demo's figures (docs/results.md) were measured without them.
PARENT=longmem_smollm2.sh
MAX_UPDATE=600
SAVE_INTERVAL_UPDATES=300
# 600 updates x 2 rows x 256 tokens = 307,200 tokens: 150 documents of 2,048 tokens
TRAIN_DOCS=160
EVAL_SETS="longrange real"
BROAD_SHARE=0
EXTRA_FLAGS="--cpu --precision auto --memory-backend torch --memory-reset-at-document-boundary --required-batch-size-multiple 1 --memory-gate-lr-scale 30 --memory-gate-no-decay --memory-gate-init 2 --memory-layer-from-retrieval-block"
# no stage mix: the demo's SmolLM2 model is the SideNet alone, as measured in docs/results.md
MIX_WITH_BACKBONE=none
