from longmem.models import newgpt, transformer_lm_sidenet  # noqa: F401
