"""A test-only fairseq plugin (``--user-dir tests/ddp_probe --task longmem_probe``): the longmem task,
recording on every rank what it reads and what it holds, in the folder ``$LONGMEM_PROBE_DIR``:

* ``rank{R}.jsonl``: one line per update: the batch's sample ids and targets;
* ``memory_rank{R}.pt``: the rank's memory bank after its last forward pass;
* ``sidenet_rank{R}.pt``: the rank's trainable weights after its last optimizer step.
"""
import json
import os

import torch
import torch.distributed as dist
from fairseq.tasks import register_task

import longmem  # noqa: F401  (registers the models and tasks)
from longmem.tasks.longmem_language_modeling import (LongMemLanguageModelingConfig, LongMemLanguageModelingTask,
                                                      model_memory)


def _rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _unwrap(model):
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


@register_task("longmem_probe", dataclass=LongMemLanguageModelingConfig)
class LongMemProbeTask(LongMemLanguageModelingTask):
    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        out = super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
        folder, rank = os.environ["LONGMEM_PROBE_DIR"], _rank()
        with open(os.path.join(folder, f"rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps({"update": update_num, "ids": sample["id"].tolist(),
                                "target": sample["target"].tolist()}) + "\n")
        model_memory(model).bank.save(os.path.join(folder, f"memory_rank{rank}.pt"))
        return out

    def optimizer_step(self, optimizer, model, update_num):
        super().optimizer_step(optimizer, model, update_num)
        trained = {k: v.detach().clone() for k, v in _unwrap(model).named_parameters() if v.requires_grad}
        torch.save(trained, os.path.join(os.environ["LONGMEM_PROBE_DIR"], f"sidenet_rank{_rank()}.pt"))
