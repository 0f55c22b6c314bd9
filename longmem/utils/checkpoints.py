"""Write a model into a file that fairseq's checkpoint loader accepts (atomically)."""
import torch

from longmem.utils.atomic import atomic_open


def save_fairseq_checkpoint(path, model_state: dict, cfg: dict = None, args=None) -> None:
    """``cfg``: a dataclass-style config dict ({"model": {...}, "task": {...}}); ``args``: a legacy
    argparse.Namespace (the released checkpoints' form). One of the two."""
    state = {
        "cfg": cfg, "args": args, "model": model_state, "extra_state": {}, "last_optimizer_state": None,
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": None}, "num_updates": 0}],
    }
    with atomic_open(str(path), "wb") as f:
        torch.save(state, f)
