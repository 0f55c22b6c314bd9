# Preset: memory-augmented adaptation of the tiny backbone on CPU (`make demo`'s long-range mix).
# Read by train_scripts/train_longmem.sh and longmem/demo.py; KEY=VALUE lines only.
# 8 rows x 256 tokens per update, each row its own stream with its own 8,192-token memory, emptied
# where a new document starts. Retrieval layer 3 = 2*1 + 1: as in the release (17 = 2*8 + 1), the
# memory layer (int(3 / 2) = 1) starts from the weights of the backbone layer whose keys fill the memory.
ARCH=transformer_lm_sidenet_tiny
TASK=longmem_language_modeling
TOKENS_PER_SAMPLE=256
BATCH_SIZE=8
UPDATE_FREQ=1
LR=2e-3
WARMUP_UPDATES=20
MAX_UPDATE=300
WEIGHT_DECAY=0.01
DROPOUT=0.1
ATTENTION_DROPOUT=0.1
MEMORY_SIZE=8192
K=32
CHUNK_SIZE=4
RETRIEVAL_LAYER_INDEX=3
LAYER_REDUCTION_FACTOR=2
EXTRA_FLAGS="--cpu --memory-backend torch --memory-reset-at-document-boundary"
SEED=1
