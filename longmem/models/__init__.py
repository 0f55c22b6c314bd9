from longmem.models import hf_causal_lm, newgpt, transformer_lm_sidenet  # noqa: F401
