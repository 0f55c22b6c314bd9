"""Which arithmetic the LongMem model runs in on the CPU (``--precision``, docs/design.md §10).

- ``fp32``: everything in fp32 (the default, and what the fairseq recipes of the release do on a CPU).
- ``bf16``: the frozen backbone runs in a bf16 copy of its weights (cast once; the fp32 weights stay in
  the model and its checkpoints), the SideNet under ``torch.autocast`` with its fp32 master weights and
  optimizer state, the memory stores bf16 keys and values and searches in fp32. Chosen only where the
  CPU computes bf16 natively (AVX-512 BF16 or AMX); where torch would emulate it (slower than fp32) the
  model stays in fp32 and says so.
- ``auto``: ``bf16`` where it is native, ``fp32`` elsewhere.

On a GPU, half precision is fairseq's own ``--fp16`` (the release's); ``--precision`` applies to CPU runs.
"""
import logging
from typing import Optional

import torch

from longmem.errors import ConfigError

logger = logging.getLogger(__name__)

CHOICES = ("fp32", "bf16", "auto")


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
