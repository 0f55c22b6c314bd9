"""Reading and writing fairseq checkpoints: what a checkpoint is, one-line errors, atomic writes."""
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
        return checkpoint_utils.load_checkpoint_to_cpu(path, arg_overrides)
    except Exception as e:  # torch's unpickling errors come in many types, with advice that does not apply
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ConfigError(f"{path} is not a readable fairseq checkpoint (truncated, corrupt or another format): "
                          f"{type(e).__name__}: {reason}") from None


def read_checkpoint(path: str, arg_overrides: Optional[dict] = None) -> dict:
    """``load_checkpoint_state`` for the scripts: a one-line exit naming the file when it is missing or not
    a readable fairseq checkpoint with model weights."""
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint {path!r} does not exist")
    try:
        state = load_checkpoint_state(path, arg_overrides)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise SystemExit(f"{path} is not a fairseq checkpoint: it holds no model weights")
    return state


def checkpoint_kind(state: dict) -> Optional[str]:
    """"longmem" for a LongMem (``transformer_lm_sidenet*``) checkpoint, "backbone" for one of a known
    backbone family, None otherwise: read from what the checkpoint records, never from its file name."""
    from longmem.models.backbone import checkpoint_model_name, family_of

    name = checkpoint_model_name(state)
    if name.startswith("transformer_lm_sidenet"):
        return "longmem"
    return "backbone" if family_of(name) is not None else None


def load_model_for_dictionary(path, dictionary, data_dir: str, device="cpu", expect: Optional[str] = None,
                              overrides: Optional[dict] = None, state: Optional[dict] = None):
    """A checkpoint's model in eval mode, after checking what it is (``expect``: "longmem" or "backbone")
    and that it predicts ``dictionary``'s symbols (a clear error instead of fairseq's shape mismatch).
    ``data_dir`` holds that dict.txt; ``overrides`` change recorded settings (e.g. pretrained_model_path);
    ``state``: the file as ``read_checkpoint(path, {"data": data_dir, **overrides})`` returned it, when the
    caller has read it already (it is not read again)."""
    from fairseq import checkpoint_utils

    from longmem.models.backbone import checkpoint_model_name
    from longmem.models.hf_causal_lm import HFCausalLM, is_hf_path

    if is_hf_path(str(path)):  # a Hugging Face model folder or .gguf file: a backbone, read as it is
        if expect not in (None, "backbone"):
            raise SystemExit(f"{path} is a Hugging Face model, not a LongMem checkpoint")
        try:
            return HFCausalLM.from_path(str(path), dictionary, 0).eval().to(device)
        except ValueError as e:
            raise SystemExit(str(e))
    if state is None:
        state = read_checkpoint(path, {"data": data_dir, **(overrides or {})})
    kind = checkpoint_kind(state)
    if expect is not None and kind != expect:
        hint = {"longmem": "a LongMem checkpoint (transformer_lm_sidenet*)",
                "backbone": "a backbone checkpoint (newgpt-*)"}[expect]
        raise SystemExit(f"{path} holds a {checkpoint_model_name(state) or 'unknown'!r} model, not {hint}")
    heads = [v for k, v in state["model"].items() if k.endswith("model.lm_head.weight")]
    if heads and heads[0].size(0) != len(dictionary):
        raise SystemExit(f"{path} predicts {heads[0].size(0)} symbols but {data_dir}/dict.txt has "
                         f"{len(dictionary)}: use data binarized with the model's dictionary (fairseq-preprocess "
                         f"--srcdict) or pass the model's dict.txt")
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([path], state=state)
    return models[0].eval().to(device)


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
