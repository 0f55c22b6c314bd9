# Preset: the released memory-augmented adaptation recipe (docs/design.md §5), one GPU's share.
# The release's order (--data-no-shuffle: each batch row its own contiguous passage of 1,024-token
# blocks) and the release's memory (one bank per GPU for all rows, its eviction rule), as in its
# train_scripts/train_longmem.sh. The release trains with 8 rows of 1024 tokens per GPU on 32 GPUs (global
# batch 256) for 100k updates; on fewer GPUs raise UPDATE_FREQ so that GPUs x 8 x UPDATE_FREQ = 256.
ARCH=transformer_lm_sidenet_gpt2_small
TASK=longmem_language_modeling
TOKENS_PER_SAMPLE=1024
BATCH_SIZE=8
UPDATE_FREQ=1
LR=2e-4
WARMUP_UPDATES=0
MAX_UPDATE=100000
WEIGHT_DECAY=0.01
DROPOUT=0.1
ATTENTION_DROPOUT=0.1
MEMORY_SIZE=65536
K=64
CHUNK_SIZE=4
RETRIEVAL_LAYER_INDEX=17
LAYER_REDUCTION_FACTOR=2
EXTRA_FLAGS="--fp16 --use-gpu-to-search --data-no-shuffle --memory-mode release --disable-validation"
SEED=42
