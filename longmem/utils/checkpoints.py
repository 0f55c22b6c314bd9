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


def load_model_for_dictionary(path, dictionary, data_dir: str, device="cpu"):
    """A checkpoint's model in eval mode, after checking that it predicts ``dictionary``'s symbols
    (a clear error instead of fairseq's shape mismatch). ``data_dir`` holds that dict.txt."""
    import os

    from fairseq import checkpoint_utils

    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint {path!r} does not exist")
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    heads = [v for k, v in state["model"].items() if k.endswith("model.lm_head.weight")]
    if heads and heads[0].size(0) != len(dictionary):
        raise SystemExit(f"{path} predicts {heads[0].size(0)} symbols but {data_dir}/dict.txt has "
                         f"{len(dictionary)}: use data binarized with the model's dictionary (fairseq-preprocess "
                         f"--srcdict) or pass the model's dict.txt")
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data_dir}, state=state)
    return models[0].eval().to(device)
