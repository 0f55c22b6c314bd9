# Preset: memory-augmented adaptation of the tiny backbone on CPU (the `make demo` corpus).
# Read by train_scripts/train_longmem.sh and longmem/demo.py; KEY=VALUE lines only.
# 8 rows x 256 tokens per update, each row its own stream with its own 8,192-token memory.
ARCH=transformer_lm_sidenet_tiny
TASK=longmem_language_modeling
TOKENS_PER_SAMPLE=256
BATCH_SIZE=8
UPDATE_FREQ=1
LR=1e-3
WARMUP_UPDATES=20
MAX_UPDATE=200
WEIGHT_DECAY=0.01
DROPOUT=0.1
ATTENTION_DROPOUT=0.1
MEMORY_SIZE=8192
K=32
CHUNK_SIZE=4
RETRIEVAL_LAYER_INDEX=2
LAYER_REDUCTION_FACTOR=2
EXTRA_FLAGS="--cpu --memory-backend torch"
SEED=1
