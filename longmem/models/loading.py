"""Which model a checkpoint holds, and loading it for evaluation: the one place that knows every model family
(the newgpt backbones, Hugging Face backbones, LongMem). Utilities below it (``longmem.utils.checkpoints``)
read and write files and know no model."""
import os
from typing import Optional

from longmem.errors import ConfigError
from longmem.models.backbone import checkpoint_model_name, family_of
from longmem.models.hf_causal_lm import HFCausalLM, is_hf_path
from longmem.utils.checkpoints import load_checkpoint_state


def read_checkpoint(path: str, arg_overrides: Optional[dict] = None) -> dict:
    """``load_checkpoint_state`` for the scripts: a one-line ``ConfigError`` naming the file when it is missing or not
    a readable fairseq checkpoint with model weights."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path!r} does not exist")
    state = load_checkpoint_state(path, arg_overrides)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ConfigError(f"{path} is not a fairseq checkpoint: it holds no model weights")
    return state


def checkpoint_kind(state: dict) -> Optional[str]:
    """"longmem" for a LongMem (``transformer_lm_sidenet*``) checkpoint, "backbone" for one of a known
    backbone family, None otherwise: read from what the checkpoint records, never from its file name."""
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

    if is_hf_path(str(path)):  # a Hugging Face model folder or .gguf file: a backbone, read as it is
        if expect not in (None, "backbone"):
            raise ConfigError(f"{path} is a Hugging Face model, not a LongMem checkpoint")
        try:
            return HFCausalLM.from_path(str(path), dictionary, 0).eval().to(device)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if state is None:
        state = read_checkpoint(path, {"data": data_dir, **(overrides or {})})
    kind = checkpoint_kind(state)
    if expect is not None and kind != expect:
        hint = {"longmem": "a LongMem checkpoint (transformer_lm_sidenet*)",
                "backbone": "a backbone checkpoint (newgpt-*)"}[expect]
        raise ConfigError(f"{path} holds a {checkpoint_model_name(state) or 'unknown'!r} model, not {hint}")
    heads = [v for k, v in state["model"].items() if k.endswith("model.lm_head.weight")]
    if heads and heads[0].size(0) != len(dictionary):
        raise ConfigError(f"{path} predicts {heads[0].size(0)} symbols but {data_dir}/dict.txt has "
                         f"{len(dictionary)}: use data binarized with the model's dictionary (fairseq-preprocess "
                         f"--srcdict) or pass the model's dict.txt")
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([path], state=state)
    return models[0].eval().to(device)
