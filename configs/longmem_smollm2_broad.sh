# The SmolLM2 recipe's levers against forgetting (docs/ablations.md §5: half of the training tokens broad real
# text, distillation to the frozen backbone on the tokens it predicts at least as well as LongMem) at half the
# recipe's updates, the 1,200-update row of docs/ablations.md §5:
#
#   longmem-recipe smollm2 OUT --preset configs/longmem_smollm2_broad.sh
#
# KEY=VALUE lines only; PARENT's lines are read first, these win.
PARENT=longmem_smollm2.sh
MAX_UPDATE=1200
SAVE_INTERVAL_UPDATES=600
# no stage mix: the 1,200-update row was measured with the SideNet alone
MIX_WITH_BACKBONE=none
