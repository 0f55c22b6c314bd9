# `make demo`'s SmolLM2 stage: the SmolLM2 recipe (its PARENT: memory from backbone layer 18, the gates' group, k,
# chunk size, the long-range mix) cut to fit the demo's time on 2 CPU cores:
#
#   longmem-recipe smollm2 OUT --preset configs/longmem_smollm2_demo.sh
#
# Fewer updates (over fewer training documents, as many as the updates read), and the evaluate stage on the
# held-out long-range set and real text only. KEY=VALUE lines only; PARENT's lines are read first, these win.
PARENT=longmem_smollm2.sh
MAX_UPDATE=600
SAVE_INTERVAL_UPDATES=300
# 600 updates x 2 rows x 256 tokens = 307,200 tokens: 150 documents of 2,048 tokens
TRAIN_DOCS=160
EVAL_SETS="longrange real"
