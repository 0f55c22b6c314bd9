"""``--criterion longmem_cross_entropy``: cross-entropy plus a KL term that keeps LongMem near its backbone.

    loss = Σ_t NLL_t + λ · Σ_t KL(p_backbone,t ‖ p_LongMem,t)          over the target tokens (padding left out)

``p_backbone`` is the frozen backbone's next-token distribution, ``softmax(lm_head(H[L]))``: its final hidden
state ``H[L]`` is computed in every LongMem step already, so the term costs one matmul with the output head
and a softmax; no gradient flows into it. λ (``--distill-weight``) 0 gives fairseq's ``cross_entropy`` (the
release's criterion) exactly. The gradient of the KL term with respect to LongMem's logits is
``λ · (p_LongMem - p_backbone)``: zero where LongMem predicts what its backbone predicts. A lever against
forgetting the backbone's skills while the SideNet adapts (docs/ablations.md).

``--distill-on backbone-better`` keeps only the tokens whose target the backbone gives at least the probability
LongMem gives it: the term holds the model where it would fall below its backbone and lets it go where it does
better, as on a token memory recalls (the backbone, which cannot see beyond its window, would pull it back there).
``--distill-on marked`` keeps every token of the documents marked in the split's ``.marks`` file (one 0/1 per
document beside ``train.bin``: the broad pieces the SmolLM2 recipe mixes in, where there is nothing to recall) and
the backbone-better tokens of the others (the long-range documents). Validation without a ``.marks`` file counts
no document as marked.
"""
import math
from dataclasses import dataclass, field

import torch
from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig
from fairseq.logging import metrics

from longmem.errors import ConfigError


@dataclass
class LongMemCrossEntropyConfig(CrossEntropyCriterionConfig):
    distill_weight: float = field(default=0.0, metadata={
        "help": "λ: weight of KL(backbone ‖ LongMem) per target token, added to the cross-entropy (0: none)"})
    distill_on: str = field(default="all", metadata={
        "help": "which target tokens the KL term covers: all; backbone-better: those whose target the backbone gives "
                "at least LongMem's probability (the term then never pulls back a token LongMem predicts better); "
                "marked: every token of the documents marked 1 in the split's .marks file (DATA/train.marks, one 0/1 "
                "per document: the recipe marks its broad pieces) and the backbone-better tokens of the others"})


DISTILL_ON = ("all", "backbone-better", "marked")


def distillation_kl(lprobs: torch.Tensor, backbone_logits: torch.Tensor, keep: torch.Tensor,
                    targets: torch.Tensor = None, always: torch.Tensor = None) -> torch.Tensor:
    """Σ over the kept positions of KL(softmax(backbone_logits) ‖ exp(lprobs)). lprobs, backbone_logits (N, V);
    keep (N,) bool. With ``targets`` (N,), only the positions whose target the backbone gives at least LongMem's
    probability are kept (``--distill-on backbone-better``), and besides them those where ``always`` (N,) bool is
    True (``--distill-on marked``). The backbone's side and the choice carry no gradient."""
    with torch.no_grad():
        reference = torch.log_softmax(backbone_logits.float(), dim=-1)
        if targets is not None:
            index = targets.clamp(min=0).unsqueeze(-1)
            better = (reference.gather(-1, index) >= lprobs.detach().float().gather(-1, index)).squeeze(-1)
            keep = keep & (better if always is None else better | always)
    kl = (reference.exp() * (reference - lprobs.float())).sum(-1)  # (N,)
    return kl[keep].sum()


@register_criterion("longmem_cross_entropy", dataclass=LongMemCrossEntropyConfig)
class LongMemCrossEntropyCriterion(CrossEntropyCriterion):
    def __init__(self, task, sentence_avg, distill_weight=0.0, distill_on="all"):
        super().__init__(task, sentence_avg)
        if not (math.isfinite(distill_weight) and distill_weight >= 0):
            raise ConfigError(f"--distill-weight must be a finite number >= 0, got {distill_weight}")
        if distill_on not in DISTILL_ON:
            raise ConfigError(f"--distill-on must be one of {', '.join(DISTILL_ON)}, got {distill_on!r}")
        self.distill_weight, self.distill_on = distill_weight, distill_on

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        nll, _ = self.compute_loss(model, net_output, sample, reduce=reduce)
        loss, kl = nll, None
        if self.distill_weight > 0:
            features = net_output[1].get("backbone_features") if isinstance(net_output[1], dict) else None
            if features is None:
                raise ConfigError("--distill-weight needs a LongMem model (--arch transformer_lm_sidenet*): it "
                                  "compares the model with its frozen backbone")
            decoder = model.decoder if hasattr(model, "decoder") else model.module.decoder
            lprobs = model.get_normalized_probs(net_output, log_probs=True).view(-1, net_output[0].size(-1))
            target = model.get_targets(sample, net_output).view(-1)
            always = None
            if self.distill_on == "marked":
                always = sample.get("marked")
                if always is None and model.training:
                    raise ConfigError("--distill-on marked needs the training split's .marks file beside it "
                                      "(DATA/train.marks: one 0/1 per document, 1 = distil every token; "
                                      "longmem.corpus.mix.write_marks, written by the recipe when BROAD_SHARE > 0) "
                                      "and the longmem_language_modeling task")
                always = None if always is None else always.reshape(-1)  # None: backbone-better tokens only
            kl = distillation_kl(lprobs, decoder.lm_head(features).view(-1, lprobs.size(-1)),
                                 target.ne(self.padding_idx), target if self.distill_on != "all" else None, always)
            loss = nll + self.distill_weight * kl
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {"loss": loss.data, "nll": nll.data, "ntokens": sample["ntokens"],
                          "nsentences": sample["target"].size(0), "sample_size": sample_size}
        if kl is not None:
            logging_output["kl"] = kl.data
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        """fairseq's loss / nll_loss / ppl of the cross-entropy alone (comparable with runs without the term), the
        total as ``loss_total`` and the KL per token as ``kl``, in bits."""
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        CrossEntropyCriterion.reduce_metrics([{**log, "loss": log.get("nll", log.get("loss", 0))}
                                              for log in logging_outputs])
        if any("kl" in log for log in logging_outputs):
            total = sum(log.get("loss", 0) for log in logging_outputs)
            kl = sum(log.get("kl", 0) for log in logging_outputs)
            metrics.log_scalar("loss_total", total / sample_size / math.log(2), sample_size, round=3)
            metrics.log_scalar("kl", kl / ntokens / math.log(2), ntokens, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
