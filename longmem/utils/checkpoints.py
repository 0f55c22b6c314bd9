"""Reading and writing fairseq checkpoint files, whatever model they hold: one-line errors, atomic writes,
intact checks. Which model a checkpoint holds, and loading it, is ``longmem.models.loading``."""
import logging
import os
from typing import Optional

import torch

from longmem.errors import ConfigError
from longmem.utils.atomic import atomic_open

logger = logging.getLogger(__name__)


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


def load_checkpoint_state(path: str, arg_overrides: Optional[dict] = None) -> dict:
    """fairseq's ``load_checkpoint_to_cpu`` (with ``arg_overrides`` applied to the config it records), or a
    one-line ``ConfigError`` naming the file when it is not a readable fairseq checkpoint."""
    from fairseq import checkpoint_utils

    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(path, arg_overrides)
    except Exception as e:  # torch's unpickling errors come in many types, with advice that does not apply
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ConfigError(f"{path} is not a readable fairseq checkpoint (truncated, corrupt or another format): "
                          f"{type(e).__name__}: {reason}") from None
    add_newer_model_options(state, arg_overrides)
    return state


def add_newer_model_options(state: dict, overrides: Optional[dict]) -> None:
    """fairseq applies an override only to a key the checkpoint's config records: an option of the model added
    after the checkpoint was written (e.g. --mix-with-backbone) is set here, where the model's dataclass has it."""
    import dataclasses

    from fairseq.models import ARCH_MODEL_REGISTRY

    model_cfg = (state.get("cfg") or {}).get("model") if isinstance(state, dict) else None
    if not overrides or model_cfg is None or not hasattr(model_cfg, "keys"):
        return
    model_class = ARCH_MODEL_REGISTRY.get(model_cfg.get("_name") or model_cfg.get("arch") or "")
    config_class = getattr(model_class, "__dataclass", None)
    known = {f.name for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else set()
    missing = {k: v for k, v in overrides.items() if k in known and k not in model_cfg}
    if missing:
        from omegaconf import open_dict

        with open_dict(model_cfg):
            for key, value in missing.items():
                model_cfg[key] = value


def is_intact(path: str) -> bool:
    """False for a torch zip checkpoint whose end is missing (a truncated copy: its central directory is
    gone), or a file that is not one; a legacy (pickle) checkpoint is taken as it is."""
    import zipfile

    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        if not zipped:
            return os.path.getsize(path) > 0
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def intact_fallback(last: str) -> Optional[str]:
    """None when ``last`` is missing or intact; else the newest intact ``checkpoint*.pt`` beside it (said in a
    warning), or a ConfigError naming ``last`` when there is none."""
    import glob

    if not os.path.exists(last) or is_intact(last):
        return None
    folder = os.path.dirname(last) or "."
    others = sorted((p for p in glob.glob(os.path.join(folder, "checkpoint*.pt"))
                     if os.path.abspath(p) != os.path.abspath(last)), key=os.path.getmtime, reverse=True)
    for path in others:
        if is_intact(path):
            logger.warning("%s is truncated (a run stopped while fairseq copied it?): resuming from %s, the newest "
                           "intact checkpoint beside it", last, path)
            return path
    raise ConfigError(f"{last} is truncated and no intact checkpoint*.pt is beside it: remove it to start afresh, or "
                      f"name another with --restore-file")


def model_settings_that_differ(path: str, model_cfg, limit: int = 6) -> str:
    """``name: checkpoint -> this run`` for the model settings of checkpoint ``path`` that differ from
    ``model_cfg`` (a fairseq model config), for an error message."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    recorded = (state.get("cfg") or {}).get("model") or vars(state.get("args") or {})
    ours = dict(model_cfg) if model_cfg is not None else {}
    differ = [f"{k}: {recorded[k]} -> {ours[k]}" for k in sorted(set(recorded) & set(ours))
              if recorded[k] != ours[k] and not k.endswith("_path") and k not in ("data", "_name")]
    if not differ:
        return "the same settings, other weight shapes"
    return ", ".join(differ[:limit]) + (f", and {len(differ) - limit} more" if len(differ) > limit else "")
