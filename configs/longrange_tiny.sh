# Preset: the long-range benchmark of `make demo` (preprocess/make_longrange.py) and its evaluation.
# Read by longmem/demo.py; KEY=VALUE lines only.
# Documents of ~2,048 BPE tokens; every recurrence and query at least MIN_GAP tokens after its source,
# beyond the 256-token segment (TOKENS_PER_SAMPLE of the presets), so only the memory can reach it.
TRAIN_DOCS=300
EVAL_DOCS=24
DOC_TOKENS=2048
MIN_GAP=512
PAIRS=24
# training mix: 10% plain real-text excerpts, the rest recurring-passage and recall documents
TEXT_FRACTION=0.1
# recurring documents: fresh blocks of 32-96 tokens alternate with recurring passages of 64-192
FRESH_BLOCK="32 96"
PASSAGE="64 192"
# in-window recurrence documents added to the backbone's pretraining data (0 = real text only);
# 250 (gaps 32-200) did not make newgpt-tiny copy in context within 260 updates (docs/ablations.md)
PRETRAIN_DOCS=0
PRETRAIN_GAP="32 200"
SEED=1
# SST-2 in-context learning: ICL_K demonstrations in context, ICL_CACHE_K more in memory. 2,000
# demonstrations are ~88k pieces of this BPE, so the memory holds 131,072 tokens; chunk 4 as trained
# (the released ICL protocol uses 2). About 1.7 s per query with memory on this CPU: 64 queries, 1 seed.
ICL_K=20
ICL_CACHE_K=2000
ICL_MEMORY_SIZE=131072
ICL_CHUNK_SIZE=4
ICL_MEMORY_BLOCK=256
ICL_MAX_QUERIES=64
ICL_SEEDS="1"
