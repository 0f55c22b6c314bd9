# The SmolLM2 recipe against forgetting (docs/ablations.md §5): half of the training tokens broad real text (stage
# broad: longmem-build-broad-corpus through longmem-prepare-pile; docs/data.md), distillation to the frozen
# backbone on the tokens it predicts at least as well as LongMem, 1,200 updates:
#
#   longmem-recipe smollm2 OUT --preset configs/longmem_smollm2_broad.sh
#
# KEY=VALUE lines only; PARENT's lines are read first, these win (EXTRA_FLAGS is the parent's with the criterion's).
PARENT=longmem_smollm2.sh
BROAD_SHARE=0.5
MAX_UPDATE=1200
SAVE_INTERVAL_UPDATES=600
EXTRA_FLAGS="--cpu --precision auto --memory-backend torch --memory-reset-at-document-boundary --required-batch-size-multiple 1 --memory-gate-lr-scale 30 --memory-gate-no-decay --memory-gate-init 2 --memory-layer-from-retrieval-block --criterion longmem_cross_entropy --distill-weight 1 --distill-on backbone-better"
