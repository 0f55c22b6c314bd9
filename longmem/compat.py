"""Small adjustments that let stock fairseq 0.12 run on today's numpy and torch.

Applied once when ``longmem`` is imported (``--user-dir longmem`` imports it before any data or
checkpoint is loaded).
"""
import argparse
import logging
import os
import sys
import types

import numpy as np
import torch


def apply() -> None:
    # fairseq's TokenBlockDataset(break_mode="eos") -- used by the hub interface and interactive
    # generation -- asks for np.compat.long, which numpy 2 removed. It means int64.
    if not hasattr(np, "compat"):
        np.compat = types.SimpleNamespace(long=np.int64)
    # torch >= 2.6 loads checkpoints with weights_only=True; legacy fairseq checkpoints (the released
    # LongMem ones included) keep their config as an argparse.Namespace.
    torch.serialization.add_safe_globals([argparse.Namespace])
    _cpu_fallbacks()


HALF_PRECISION_FLAGS = ("--fp16", "--memory-efficient-fp16", "--amp")


def _cpu_fallbacks() -> None:
    """A fairseq command line with --fp16 (or --memory-efficient-fp16, --amp) on a machine without a CUDA
    GPU: fairseq would fail deep inside with a CUDA traceback. The flag is dropped before fairseq parses
    the command line (``--user-dir`` is imported first), with one line saying so: training runs in fp32."""
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    if not (program.startswith("fairseq-") or "fairseq_cli" in (sys.argv[0] if sys.argv else "")):
        return
    if torch.cuda.is_available():
        return
    dropped = [flag for flag in HALF_PRECISION_FLAGS if flag in sys.argv[1:]]
    if dropped:
        sys.argv[1:] = [a for a in sys.argv[1:] if a not in HALF_PRECISION_FLAGS]
        logging.getLogger("longmem").warning(
            "%s needs a CUDA GPU and torch.cuda.is_available() is False here: ignored, running in fp32 on the CPU",
            " ".join(dropped))
