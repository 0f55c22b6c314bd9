#!/usr/bin/env python
"""What would a fixed mixture with the backbone do to a trained SmolLM2 LongMem? ``p = (1 - λ) p_backbone +
λ p_LongMem`` for several λ, from one pass per data set: every target token's probability under the backbone
(from the ``H[L]`` a LongMem forward computes anyway) and under LongMem with memory off and on. The mixture of two
distributions gives its target the same mixture of the two probabilities, so the table is exact for each λ, with no
model run per λ (``--mix-with-backbone constant --mix-gate-init logit(λ)`` computes the same, one λ at a time).

``--memory-rules S:C ...`` also scores the mixture that reads memory (``--mix-with-backbone memory``): λ_t =
σ(logit(--rule-lambda) + S·(z_t - C)) where the token reads memory, z_t the memory layer's evidence (cached per token
in ``RUN/mixture/<set>.evidence.pt`` from one more memory-on pass), --rule-lambda where it reads none and with memory
off.

Data sets: the run's held-out long-range set (recurring, queried and unmarked tokens; memory on / off), its held-out
real text, and the broad corpus's held-out sources (book, technical; ``heldout_smollm2.py`` builds them). Per-token
probabilities are cached in ``RUN/mixture/<set>.pt``.

    python tests/benchmarks/mixture_smollm2.py runs/ROW --broad OUT/broad [--lambdas 0.3 0.5 0.7 0.9 1] \
        [--memory-rules 1:2 0.5:2 --rule-lambda 0.7]
"""
import argparse
import math
import os

import torch

from longmem.commands.set_mixture import mixed_log_probs

SETS = {  # name: (where its data-bin is: RUN or the held-out cache BROAD/heldout-smollm2, that data-bin, its token
    # mask under RUN or None)
    "longrange": ("run", "data-bin-longrange", os.path.join("tokens", "longrange", "test.mask")),
    "real": ("run", "data-bin-real", None),
    "book": ("heldout", "book", None),
    "technical": ("heldout", "technical", None),
}


@torch.no_grad()
def target_log_probs(model, stream, eos: int, window: int) -> dict:
    """{"backbone", "off", "on"}: each target token's log-probability (float64), documents read as
    ``longmem-eval-lm`` reads them (segments of ``window``, memory emptied per document)."""
    from longmem.evaluation.lm import document_spans

    out = {"backbone": [], "off": [], "on": []}
    for start, end in document_spans(stream.doc_start):
        tokens = stream.tokens[start:end]
        src = torch.cat([torch.tensor([eos]), tokens[:-1]])
        for memory in (False, True):
            with model.memory.configured(slot="eval", enabled=memory, writes=True, reads=True):
                model.memory.reset()
                for a in range(0, len(tokens), window):
                    logits, extra = model(src[a: a + window].unsqueeze(0))
                    target = tokens[a: a + window].unsqueeze(-1)
                    out["on" if memory else "off"].append(
                        torch.log_softmax(logits[0].double(), -1).gather(-1, target).squeeze(-1))
                    if not memory:
                        backbone = model.decoder.lm_head(extra["backbone_features"])[0]
                        out["backbone"].append(torch.log_softmax(backbone.double(), -1).gather(-1, target).squeeze(-1))
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def memory_evidence(model, stream, eos: int, window: int) -> dict:
    """{"z", "present"}: each target token's memory evidence with memory on (``model`` loaded with
    ``--mix-with-backbone memory``), documents read as ``target_log_probs`` reads them."""
    from longmem.evaluation.lm import document_spans

    out = {"z": [], "present": []}
    for start, end in document_spans(stream.doc_start):
        tokens = stream.tokens[start:end]
        src = torch.cat([torch.tensor([eos]), tokens[:-1]])
        with model.memory.configured(slot="eval", enabled=True, writes=True, reads=True):
            model.memory.reset()
            for a in range(0, len(tokens), window):
                features, _ = model(src[a: a + window].unsqueeze(0), features_only=True)
                z, present = model.decoder.memory_evidence(features[0])
                out["z"].append(z.double())
                out["present"].append(present)
    return {k: torch.cat(v) for k, v in out.items()}


def rule_log_probs(side, backbone, evidence, lam: float, slope: float, center: float):
    """log((1 - λ_t) p_backbone + λ_t p_SideNet), λ_t = σ(logit(λ) + slope·(z_t - center)) where the token read
    memory, λ where it did not."""
    a = math.log(lam / (1 - lam)) + torch.where(evidence["present"], slope * (evidence["z"] - center),
                                                torch.zeros_like(evidence["z"]))
    return torch.logaddexp(torch.nn.functional.logsigmoid(-a) + backbone, torch.nn.functional.logsigmoid(a) + side)


def memory_rule(text: str):
    slope, _, center = text.partition(":")
    return float(slope), float(center)


def ppl(log_probs: torch.Tensor) -> float:
    return math.exp(-float(log_probs.mean()))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a SmolLM2 recipe's OUT (longmem/checkpoint_last.pt, its data-bins)")
    p.add_argument("--broad", required=True, help="the broad corpus's folder (its heldout-smollm2/ cache)")
    p.add_argument("--checkpoint", help="default RUN/longmem/checkpoint_last.pt")
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0])
    p.add_argument("--memory-rules", type=memory_rule, nargs="+", default=[], metavar="S:C",
                   help="mixtures that read memory, each slope S and center C (--mix-with-backbone memory)")
    p.add_argument("--rule-lambda", type=float, default=0.7, help="the memory rules' λ without memory evidence")
    args = p.parse_args()
    if not 0 < args.rule_lambda < 1:
        p.error(f"--rule-lambda must lie in (0, 1), got {args.rule_lambda}")
    from longmem.evaluation.lm import load_split, load_token_marks
    from longmem.models.loading import load_model_for_dictionary

    checkpoint = args.checkpoint or os.path.join(args.run, "longmem", "checkpoint_last.pt")
    cache = os.path.join(args.run, "mixture")
    os.makedirs(cache, exist_ok=True)
    model = reader = None
    rows = []
    for name, (where, data, mask) in SETS.items():
        data = os.path.join(args.run if where == "run" else os.path.join(args.broad, "heldout-smollm2"), data)
        path = os.path.join(cache, f"{name}.pt")
        dictionary, stream = load_split(data, "test")
        if not os.path.isfile(path):
            if model is None:
                model = load_model_for_dictionary(checkpoint, dictionary, data, "cpu", expect="longmem")
            scores = target_log_probs(model, stream, dictionary.eos(), 256)
            if mask:
                scores["marks"] = load_token_marks(os.path.join(args.run, mask), stream, "test")
            torch.save(scores, path + ".tmp")
            os.replace(path + ".tmp", path)
        scores = torch.load(path)
        if args.memory_rules:
            path = os.path.join(cache, f"{name}.evidence.pt")
            if not os.path.isfile(path):
                if reader is None:
                    reader = load_model_for_dictionary(checkpoint, dictionary, data, "cpu", expect="longmem",
                                                       overrides={"mix_with_backbone": "memory"})
                evidence = memory_evidence(reader, stream, dictionary.eos(), 256)
                torch.save(evidence, path + ".tmp")
                os.replace(path + ".tmp", path)
            evidence = torch.load(path)
        groups = {"all": torch.ones_like(scores["off"], dtype=torch.bool)}
        if "marks" in scores:
            groups = {"recurring": scores["marks"] == 1, "queried": scores["marks"] == 2,
                      "unmarked": scores["marks"] == 0}
        for group, keep in groups.items():
            b = scores["backbone"][keep]
            cells = []
            for lam in args.lambdas:
                off, on = (ppl(mixed_log_probs(scores[m][keep], b, lam)) for m in ("off", "on"))
                cells.append(f"{off / ppl(b):.3f} / {on / off:.3f}")
            for slope, center in args.memory_rules:  # memory off: no evidence, λ = --rule-lambda
                off = ppl(mixed_log_probs(scores["off"][keep], b, args.rule_lambda))
                on = ppl(rule_log_probs(scores["on"][keep], b, {k: v[keep] for k, v in evidence.items()},
                                        args.rule_lambda, slope, center))
                cells.append(f"{off / ppl(b):.3f} / {on / off:.3f}")
            rows.append(f"| {name} {group} | {ppl(b):.2f} | " + " | ".join(cells) + " |")
    print("perplexity of the mixture: memory off / backbone, memory on / memory off")
    rules = [f"memory λ={args.rule_lambda:g} s={s:g} c={c:g}" for s, c in args.memory_rules]
    print("| tokens | backbone | " + " | ".join([f"λ = {lam:g}" for lam in args.lambdas] + rules) + " |")
    print("|---|---:|" + "---:|" * (len(args.lambdas) + len(rules)))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
