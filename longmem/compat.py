"""Small adjustments that let stock fairseq 0.12 run on today's numpy and torch.

Applied once when ``longmem`` is imported (``--user-dir longmem`` imports it before any data or
checkpoint is loaded).
"""
import argparse
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
