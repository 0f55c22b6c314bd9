"""Which arithmetic the LongMem model runs in on the CPU (``--precision``, docs/design.md §10).

- ``fp32``: everything in fp32 (the default, and what the fairseq recipes of the release do on a CPU).
- ``bf16``: the frozen backbone runs in a bf16 copy of its weights (cast once; the fp32 weights stay in
  the model and its checkpoints), the SideNet under ``torch.autocast`` with its fp32 master weights and
  optimizer state, the memory stores bf16 keys and values and searches in fp32. Chosen only where the
  CPU computes bf16 natively (AVX-512 BF16 or AMX); where torch would emulate it (slower than fp32) the
  model stays in fp32 and says so.
- ``auto``: ``bf16`` where it is native, ``fp32`` elsewhere.

On a GPU, half precision is fairseq's own ``--fp16`` (the release's); ``--precision`` applies to CPU runs.

Whatever the precision, building a LongMem model asks glibc to keep freed memory for reuse
(:func:`keep_freed_memory`): a training step allocates and frees its logits and their gradients, 2 x 256 x
49,152 floats for SmolLM2 (100 MB each), and glibc otherwise returns such blocks to the kernel on free, so
that every step pays page faults to fault them in again (docs/benchmarks.md).
"""
import ctypes
import logging
import os
import sys
from typing import Optional

import torch

from longmem.errors import ConfigError

logger = logging.getLogger(__name__)

CHOICES = ("fp32", "bf16", "auto")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_kept = None


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve every block from its heap and keep freed ones (no per-block mmap; up to
    2 GiB of free memory kept at the heap's top before it trims), once per process; the process's memory then stays at its peak instead of being
    returned and faulted in again each step. ``LONGMEM_KEEP_FREED_MEMORY=0`` leaves malloc as it is.
    False where there is no glibc (or it refuses)."""
    global _kept
    if _kept is None:
        _kept = False
        if os.environ.get("LONGMEM_KEEP_FREED_MEMORY", "1") != "0" and sys.platform.startswith("linux"):
            try:
                mallopt = ctypes.CDLL("libc.so.6").mallopt
            except (OSError, AttributeError):
                mallopt = None
            if mallopt is not None:
                _kept = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
                logger.info("glibc malloc keeps freed memory for reuse: %s (LONGMEM_KEEP_FREED_MEMORY=0 to leave it)",
                            "yes" if _kept else "refused")
    return _kept


def native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX-512 BF16 or AMX tiles), as torch reports it."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(cpu, probe, None)
        if check is not None and check():
            return True
    return False


def resolve(requested: str, device: torch.device, log: bool = True) -> Optional[torch.dtype]:
    """``torch.bfloat16`` when the model should run in bf16 autocast on ``device``, else None (fp32)."""
    if requested not in CHOICES:
        raise ConfigError(f"--precision {requested!r}: choose one of {', '.join(CHOICES)}")
    if requested == "fp32":
        return None
    if device.type != "cpu":
        if log:
            logger.info("--precision %s applies to CPU runs; on %s use fairseq's --fp16 (the release's): fp32 here",
                        requested, device.type)
        return None
    if not native_bf16():
        if log:
            (logger.warning if requested == "bf16" else logger.info)(
                "--precision %s: this CPU has no native bf16 (AVX-512 BF16 or AMX), torch would emulate it "
                "slower than fp32: running in fp32", requested)
        return None
    if log:
        logger.info("--precision %s: bf16 on this CPU (native): the frozen backbone in a bf16 copy of its weights, "
                    "the SideNet under autocast with fp32 master weights, memory stored in bf16", requested)
    return torch.bfloat16
