# Preset: pretrain the tiny newgpt backbone on CPU (the `make demo` corpus, about 1.2M tokens).
# Read by train_scripts/pretrain_backbone.sh and longmem/demo.py; KEY=VALUE lines only.
ARCH=newgpt-tiny
TOKENS_PER_SAMPLE=256
BATCH_SIZE=16
LR=2e-3
WARMUP_UPDATES=100
MAX_UPDATE=1200
WEIGHT_DECAY=0.01
DROPOUT=0.1
ATTENTION_DROPOUT=0.1
CLIP_NORM=1.0
SEED=1
