"""Parameter groups for fairseq's optimizers: a parameter may ask for its own learning-rate scale and
for no weight decay (``--memory-gate-lr-scale``, ``--memory-gate-no-decay``; docs/ablations.md says why
the memory gates want both).

fairseq 0.12 builds every optimizer over one flat list of parameters and sets one learning rate on all
its groups. A parameter that carries ``longmem_optim = {"lr_scale": s, "no_weight_decay": True}`` is
moved, right after the optimizer is built, into a group of its own whose learning rate follows the
schedule times ``s`` and whose weight decay is 0. Where no parameter asks for anything (the defaults),
the optimizer is fairseq's, untouched: one group, as the release trains.
"""
from typing import Dict, List

import torch

ATTRIBUTE = "longmem_optim"


def request(parameter: torch.nn.Parameter, lr_scale: float = 1.0, no_weight_decay: bool = False) -> None:
    """Ask for ``parameter`` to get its own group; the defaults ask for nothing."""
    spec = {}
    if lr_scale != 1.0:
        spec["lr_scale"] = float(lr_scale)
    if no_weight_decay:
        spec["no_weight_decay"] = True
    if spec:
        setattr(parameter, ATTRIBUTE, spec)
    elif hasattr(parameter, ATTRIBUTE):
        delattr(parameter, ATTRIBUTE)


def requested(parameters) -> bool:
    return any(getattr(p, ATTRIBUTE, None) for p in parameters)


def split(optimizer):
    """Move the parameters of the first group that ask for settings into groups of their own (one per
    distinct request), and make ``optimizer.set_lr`` honour each group's ``lr_scale``. ``optimizer``:
    a FairseqOptimizer. Returns it."""
    inner = optimizer.optimizer
    base = inner.param_groups[0]
    wanted: Dict[tuple, List[torch.nn.Parameter]] = {}
    for p in base["params"]:
        spec = getattr(p, ATTRIBUTE, None)
        if spec:
            wanted.setdefault(tuple(sorted(spec.items())), []).append(p)
    if not wanted:
        return optimizer
    moved = {id(p) for group in wanted.values() for p in group}
    base["params"] = [p for p in base["params"] if id(p) not in moved]
    for spec, params in wanted.items():
        spec = dict(spec)
        group = {"params": params, "lr_scale": spec.get("lr_scale", 1.0)}
        group["lr"] = base["lr"] * group["lr_scale"]
        if spec.get("no_weight_decay") and "weight_decay" in base:
            group["weight_decay"] = 0.0
        inner.add_param_group(group)

    def set_lr(lr):
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    optimizer.set_lr = set_lr  # get_lr reads group 0: the schedule's own value
    return optimizer


def install() -> None:
    """Wrap ``fairseq.optim.build_optimizer`` (what fairseq's Trainer calls) with :func:`split`."""
    from fairseq import optim

    if getattr(optim.build_optimizer, "_longmem", False):
        return
    build = optim.build_optimizer

    def build_optimizer(cfg, params, *args, **kwargs):
        return split(build(cfg, params, *args, **kwargs))

    build_optimizer._longmem = True
    optim.build_optimizer = build_optimizer


def check_reached(model, optimizer) -> None:
    """A model whose parameters ask for groups, trained by an optimizer that does not have them (fairseq's
    --fp16 optimizers copy the parameters into flat fp32 ones): a one-line error, not a silent default. Frozen
    parameters (e.g. the memory gates under --train-mix-gate-only) ask for nothing."""
    from longmem.errors import ConfigError

    if getattr(optimizer, "_longmem_checked", False):
        return
    optimizer._longmem_checked = True
    if requested(p for p in model.parameters() if p.requires_grad) and len(optimizer.param_groups) == 1:
        raise ConfigError("--memory-gate-lr-scale / --memory-gate-no-decay need the gates in a parameter group "
                          "of their own, which fairseq's --fp16/--bf16/--amp optimizers do not keep: train without "
                          "them or leave both options at their defaults")
