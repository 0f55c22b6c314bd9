"""LongMem for fairseq: pass ``--user-dir longmem``; importing this package registers everything.

The fairseq-free parts (``longmem.modules``: ALiBi, the memory bank) import without fairseq, e.g. on a
GPU machine that only benchmarks the memory.
"""
import importlib.util

from longmem import compat

compat.apply()

if importlib.util.find_spec("fairseq") is not None:  # registers the models, archs and tasks
    from longmem.models import hf_causal_lm, newgpt, transformer_lm_sidenet  # noqa: F401
    from longmem.tasks import longmem_language_modeling  # noqa: F401
    from longmem.criterions import distillation  # noqa: F401
