"""A LongMem checkpoint mixed with its backbone at a fixed λ (``longmem-set-mixture``): a copy of the checkpoint
whose next-token distribution is ``(1 - λ)·p_backbone + λ·p_SideNet`` (``--mix-with-backbone constant``, the gate's
logit fixed at log(λ / (1 - λ)); docs/fidelity.md M23), every other weight as it was.

    longmem-set-mixture OUT/longmem/checkpoint_last.pt OUT/longmem-mix/checkpoint_last.pt --lambda 0.7

With ``--memory-slope S --memory-center C`` the mixture reads memory instead (``--mix-with-backbone memory``): λ_t =
σ(logit(λ) + S·(z_t - C)) where the token reads memory, z_t the memory layer's evidence (how strongly memory matches
its query against its local context), and λ where it reads none (memory off, the first segment of a document):

    longmem-set-mixture IN OUT --lambda 0.7 --memory-slope 1 --memory-center 2

The copy holds no optimizer state: evaluate it (``longmem-eval-lm``, ``longmem-eval-icl``, ``longmem-generate``), or
train from it with ``--restore-file ... --reset-optimizer``. A checkpoint that mixes already (constant or per-token
gate) gets the new one instead. ``python tests/benchmarks/icl_mixture.py`` and
``tests/benchmarks/mixture_smollm2.py`` measure every λ from one pass, to choose it.
"""
import argparse
import math

from longmem.errors import ConfigError
from longmem.utils.cli import exit_on_config_error, input_file, output_file


def gate_logit(lam: float) -> float:
    """log(λ / (1 - λ)): the constant gate's b for a mixture weight λ in (0, 1)."""
    return math.log(lam) - math.log1p(-lam)


def mixed_log_probs(side, backbone, lam: float):
    """log((1 - λ)·p_backbone + λ·p_SideNet) of two tensors of log-probabilities (of whole distributions or of the
    same targets): what a checkpoint this command writes outputs, for any λ in [0, 1] (0: the backbone's, 1: the
    SideNet's)."""
    import torch

    if lam <= 0:
        return backbone
    if lam >= 1:
        return side
    return torch.logaddexp(math.log1p(-lam) + backbone, math.log(lam) + side)


def set_mixture(src: str, dst: str, lam: float, memory=None) -> None:
    """Write ``src``'s LongMem checkpoint to ``dst`` (atomically) with a constant mixture at ``lam``, or with
    ``memory`` = (slope, center) the mixture that reads memory."""
    import torch
    from omegaconf import OmegaConf, open_dict

    from longmem.models.loading import checkpoint_kind, checkpoint_model_name
    from longmem.models.transformer_lm_sidenet import MAX_GATE_INIT
    from longmem.utils.atomic import atomic_open
    from longmem.utils.checkpoints import load_checkpoint_state

    if not 0 < lam < 1:
        raise ConfigError(f"--lambda must lie strictly between 0 (the backbone alone) and 1 (the SideNet alone), got "
                          f"{lam:g}")
    b = gate_logit(lam)
    if abs(b) > MAX_GATE_INIT:
        raise ConfigError(f"--lambda {lam:g} is too close to 0 or 1 (its logit {b:.1f} lies outside "
                          f"±{MAX_GATE_INIT:g}): use the checkpoint without a mixture, or the backbone alone")
    if memory is not None and not all(math.isfinite(v) and abs(v) <= MAX_GATE_INIT for v in memory):
        raise ConfigError(f"--memory-slope and --memory-center must be finite numbers in ±{MAX_GATE_INIT:g}, got "
                          f"{memory[0]:g} and {memory[1]:g}")
    state = load_checkpoint_state(src)
    if checkpoint_kind(state) != "longmem":
        raise ConfigError(f"{src} holds a {checkpoint_model_name(state) or 'unknown'!r} model, not a LongMem checkpoint "
                          f"(transformer_lm_sidenet*): only a LongMem model has a SideNet to mix with its backbone")
    model_cfg = state["cfg"]["model"]
    if model_cfg.get("start_as_backbone", False):
        raise ConfigError(f"{src} was trained with --start-as-backbone, another way to keep the backbone's output: "
                          f"a mixture cannot be added to it")
    if memory is not None and not model_cfg.get("use_external_memory", False):
        raise ConfigError(f"{src} has no memory layer (trained without --use-external-memory): a mixture that reads "
                          f"memory needs one; drop --memory-slope and --memory-center for a constant mixture")
    with open_dict(model_cfg):
        model_cfg["mix_with_backbone"] = "constant" if memory is None else "memory"
        model_cfg["mix_gate_init"] = b
        model_cfg["train_mix_gate_only"] = False
        if memory is not None:
            model_cfg["mix_memory_slope"], model_cfg["mix_memory_center"] = memory
    weights = state["model"]
    weights.pop("decoder.mix_gate.weight", None)  # a per-token gate's weights: these gates have none
    weights["decoder.mix_bias"] = torch.tensor([b], dtype=torch.float32)
    state["cfg"] = OmegaConf.to_container(state["cfg"], resolve=True, enum_to_str=True)
    state["args"] = None  # the config above is the one fairseq reads (a released checkpoint's args became it)
    state["last_optimizer_state"] = None
    with atomic_open(dst, "wb") as f:
        torch.save(state, f)


def main(argv=None):
    return exit_on_config_error(run, argv)


def run(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=input_file, help="a LongMem checkpoint")
    p.add_argument("out", type=output_file, help="where the mixed copy goes")
    p.add_argument("--lambda", dest="lam", type=float, required=True,
                   help="the SideNet's weight λ in the mixture, in (0, 1) (with --memory-slope: where a token reads no "
                        "memory)")
    p.add_argument("--memory-slope", type=float, help="the mixture reads memory: λ_t = σ(logit(λ) + S·(z_t - C))")
    p.add_argument("--memory-center", type=float, help="C of --memory-slope (the evidence at which λ_t = λ)")
    args = p.parse_args(argv)
    if (args.memory_slope is None) != (args.memory_center is None):
        p.error("--memory-slope and --memory-center go together: give both (a mixture that reads memory) or neither "
                "(a constant mixture)")
    memory = None if args.memory_slope is None else (args.memory_slope, args.memory_center)
    set_mixture(args.checkpoint, args.out, args.lam, memory)
    rule = "" if memory is None else f", reading memory (slope {memory[0]:g}, center {memory[1]:g})"
    print(f"{args.out}: {args.checkpoint} mixed with its backbone, λ = {args.lam:g} (gate logit "
          f"{gate_logit(args.lam):.4f}){rule}")


if __name__ == "__main__":
    main()
