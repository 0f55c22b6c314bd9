"""The equal-weight average of several checkpoints of one LongMem adaptation (``longmem-average-checkpoints``): a
checkpoint whose every floating-point weight is the mean of the inputs' (the frozen backbone, the same in all of
them, stays as it is), with the last input's config, update count and the rest.

    longmem-average-checkpoints OUT/longmem/checkpoint_avg.pt OUT/longmem/checkpoint_1_{1200,1500,1800,2100,2400}.pt

fairseq's own ``scripts/average_checkpoints.py`` does the same for any model but is not installed with the fairseq
package; this one refuses what would average to nonsense: inputs that are not LongMem checkpoints, of other shapes,
or over other backbones. Keep the checkpoints to average with ``--keep-interval-updates -1`` (or a count) during
training. The average holds no optimizer state: evaluate it (``longmem-eval-lm``, ``longmem-eval-icl``), mix it with
its backbone (``longmem-set-mixture``), or train from it with ``--restore-file ... --reset-optimizer`` (the data goes
on after the last input's batches). Its ``extra_state["averaged_from"]`` records the inputs and their updates.
"""
import argparse
import os

from longmem.errors import ConfigError
from longmem.utils.cli import exit_on_config_error, input_file, output_file

BACKBONE_PREFIX = "decoder.pretrained_model."


def updates_of(state: dict):
    history = state.get("optimizer_history") or [{}]
    return history[-1].get("num_updates")


class _Mean:
    """The running mean of model state dicts, added one at a time (one input in memory besides the sum): floating
    tensors summed in float64 and cast back to their dtype at the end; the frozen backbone and any non-floating
    tensor must be equal in every input and are kept from the first."""

    def __init__(self):
        self.first = self.first_name = None
        self.sums, self.count = {}, 0

    def add(self, state: dict, name: str) -> None:
        import torch

        if self.first is None:
            self.first, self.first_name = state, name
            self.sums = {k: v.double() for k, v in state.items() if self._averaged(k, v)}
            self.count = 1
            return
        first = self.first
        if state.keys() != first.keys():
            extra = sorted(state.keys() - first.keys()) or sorted(first.keys() - state.keys())
            raise ConfigError(f"{name} and {self.first_name} hold different weights ({extra[0]} is in only one of "
                              f"them): average checkpoints of one adaptation run")
        for key, value in state.items():
            ref = first[key]
            if value.shape != ref.shape or value.dtype != ref.dtype:
                raise ConfigError(f"{key} is {tuple(value.shape)} {value.dtype} in {name} but {tuple(ref.shape)} "
                                  f"{ref.dtype} in {self.first_name}: average checkpoints of one adaptation run")
            if self._averaged(key, value):
                self.sums[key] += value.double()
            elif not torch.equal(value, ref):
                what = "a tensor of the frozen backbone" if key.startswith(BACKBONE_PREFIX) else "a non-floating tensor"
                raise ConfigError(f"{key}, {what}, differs between {name} and {self.first_name}: they were not "
                                  f"adapted over the same backbone; average checkpoints of one adaptation run")
        self.count += 1

    @staticmethod
    def _averaged(key, value) -> bool:
        return value.is_floating_point() and not key.startswith(BACKBONE_PREFIX)

    def result(self) -> dict:
        return {k: (self.sums[k] / self.count).to(v.dtype) if k in self.sums else v for k, v in self.first.items()}


def average_checkpoints(paths: list, dst: str) -> dict:
    """Write the average of the LongMem checkpoints ``paths`` to ``dst`` (atomically); returns its state."""
    import torch
    from omegaconf import OmegaConf

    from longmem.models.loading import checkpoint_kind, checkpoint_model_name
    from longmem.utils.atomic import atomic_open
    from longmem.utils.checkpoints import load_checkpoint_state

    if len(paths) < 2:
        raise ConfigError(f"averaging needs at least two checkpoints, got {len(paths)}")
    if len(set(map(os.path.realpath, paths))) < len(paths):
        raise ConfigError("a checkpoint is named twice: each input counts once in the average")
    mean, sources = _Mean(), []
    for path in paths:
        state = load_checkpoint_state(path)
        if checkpoint_kind(state) != "longmem":
            raise ConfigError(f"{path} holds a {checkpoint_model_name(state) or 'unknown'!r} model, not a LongMem "
                              f"checkpoint (transformer_lm_sidenet*): only LongMem checkpoints are averaged here")
        mean.add(state.pop("model"), path)
        sources.append({"path": os.path.abspath(path), "num_updates": updates_of(state)})
    result = state  # the last input's config, update count and meters
    result["model"] = mean.result()
    result["last_optimizer_state"] = None
    if result.get("cfg") is not None:
        result["cfg"] = OmegaConf.to_container(result["cfg"], resolve=True, enum_to_str=True)
        result["args"] = None
    extra = dict(result.get("extra_state") or {})
    extra["averaged_from"] = sources
    result["extra_state"] = extra
    with atomic_open(dst, "wb") as f:
        torch.save(result, f)
    return result


def main(argv=None):
    return exit_on_config_error(run, argv)


def run(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=output_file, help="where the averaged checkpoint goes")
    p.add_argument("checkpoints", nargs="+", type=input_file, help="two or more checkpoints of one LongMem adaptation")
    args = p.parse_args(argv)
    state = average_checkpoints(args.checkpoints, args.out)
    updates = ", ".join(str(entry["num_updates"]) for entry in state["extra_state"]["averaged_from"])
    print(f"{args.out}: the average of {len(args.checkpoints)} LongMem checkpoints (updates {updates})")


if __name__ == "__main__":
    main()
