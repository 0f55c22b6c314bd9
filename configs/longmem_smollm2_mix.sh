# The SmolLM2 recipe with stage mix: after adaptation, LongMem's next-token distribution is a per-token mixture of
# its backbone's and its SideNet's (--mix-with-backbone token), the gate (581 numbers) trained alone for 200 updates
# on the training batches after those adaptation read; the checkpoint is OUT/longmem-mix/checkpoint_last.pt.
# On whole sources the training never saw, it is below its backbone's perplexity where the SideNet alone is 1.08 /
# 1.21 times it; recall is kept; in-context learning with memory falls back near the backbone's, which is why the
# recipe itself mixes at a fixed λ = 0.7 instead (docs/ablations.md §5):
#
#   longmem-recipe smollm2 OUT --preset configs/longmem_smollm2_mix.sh
#
# KEY=VALUE lines only; PARENT's lines are read first, these win.
PARENT=longmem_smollm2.sh
MIX_WITH_BACKBONE=token
MIX_UPDATES=200
MIX_LAMBDA=0.5
