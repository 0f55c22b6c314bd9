# Preset: pretrain the tiny newgpt backbone on CPU (the `make demo` corpus, about 1.3M BPE tokens).
# Read by train_scripts/pretrain_backbone.sh and longmem/demo.py; KEY=VALUE lines only.
# Sized for 2 CPU cores: about 2,300 tokens/s, so 260 updates of 16 x 256 tokens take ~8 minutes.
# Dropout is off: the run sees each token less than once, and CPU dropout masks cost ~14% of a step.
ARCH=newgpt-tiny
TOKENS_PER_SAMPLE=256
BATCH_SIZE=16
LR=3e-3
WARMUP_UPDATES=30
MAX_UPDATE=260
WEIGHT_DECAY=0.01
DROPOUT=0.0
ATTENTION_DROPOUT=0.0
CLIP_NORM=1.0
SEED=1
EXTRA_FLAGS="--cpu"
