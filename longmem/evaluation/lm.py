"""Long-document perplexity: each document read in order with its own memory, losses kept per token.

The paper reports LongMem's perplexity on PG-22 by document-length bucket and on ArXiv; the release
ships no script for it. Here every document of a binarized split is streamed in segments of
``tokens_per_sample`` (no overlap) through one model; a LongMem model's memory is emptied at the start
of each document and filled as the document is read (retrieve, then write), so each segment sees the
document's earlier segments. The same per-token losses give perplexity overall, per length bucket and
per position in the document.
"""
import contextlib
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from longmem.errors import ConfigError

# PG-22's length buckets (tokens), with one more for short documents
LENGTH_BUCKETS = [(0, 5_000, "<5k"), (5_000, 10_000, "5k-10k"), (10_000, 100_000, "10k-100k"),
                  (100_000, 500_000, "100k-500k"), (500_000, 1_000_000, "500k-1M"), (1_000_000, math.inf, ">1M")]


def load_split(data_dir: str, split: str):
    """(dictionary, TokenStream) of a split of a fairseq data-bin folder, or a one-line error."""
    import os

    from fairseq.data import Dictionary, data_utils

    from longmem.tasks.stream_dataset import TokenStream

    dict_path = os.path.join(data_dir, "dict.txt")
    if not os.path.isfile(dict_path):
        raise ConfigError(f"{data_dir} holds no dict.txt: pass a fairseq-preprocess output folder")
    dictionary = Dictionary.load(dict_path)
    dataset = data_utils.load_indexed_dataset(os.path.join(data_dir, split), dictionary)
    if dataset is None:
        raise ConfigError(f"split {split!r} not found in {data_dir}")
    if len(dataset) == 0:
        raise ConfigError(f"split {split!r} of {data_dir} is empty")
    return dictionary, TokenStream(dataset, dictionary.eos())


def load_token_marks(path: str, stream, split: str) -> torch.Tensor:
    """``read_token_marks`` of a split's ``.mask`` file, checked against the split's stream, or a one-line
    error naming the file."""
    import os

    if not os.path.isfile(path):
        raise ConfigError(f"--token-mask {path} does not exist: pass the .mask file that "
                         f"preprocess/make_longrange.py wrote beside the split's .bpe")
    try:
        marks = read_token_marks(path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if len(marks) != len(stream.tokens):
        raise ConfigError(f"{path} marks {len(marks)} tokens but split {split!r} has {len(stream.tokens)}: pass "
                         f"the .mask written with the .bpe file that was binarized")
    return marks


def document_spans(doc_start: torch.Tensor) -> List[tuple]:
    """(start, end) of every document of a stream, from its document-start marks."""
    starts = torch.nonzero(doc_start).view(-1).tolist()
    ends = starts[1:] + [len(doc_start)]
    return list(zip(starts, ends))


def length_bucket(n_tokens: int) -> str:
    for low, high, name in LENGTH_BUCKETS:
        if low <= n_tokens < high:
            return name
    raise ValueError(n_tokens)


def position_bin(position: int) -> int:
    """Log2 bins of the position in the document: 0 = [0, 256), 1 = [256, 512), 2 = [512, 1024), ..."""
    return max(0, int(position).bit_length() - 8)


def read_token_marks(path: str) -> torch.Tensor:
    """A ``.mask`` file (one line of small integers per line of the ``.bpe`` file that was binarized;
    0 = unmarked, other values name a kind of mark) as one int per token of the split's stream: each
    line's marks, then a 0 for the line's ``</s>``."""
    marks = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not all(x.isdigit() and len(x) < 3 for x in fields):
                raise ValueError(f"{path}:{n}: expected space-separated integer marks (0 = none), "
                                 f"got {line.strip()[:60]!r}")
            marks.extend(int(x) for x in fields)
            marks.append(0)
    return torch.tensor(marks, dtype=torch.long)


def position_bins(n: int) -> torch.Tensor:
    """``position_bin`` of positions 0..n-1 at once: frexp's exponent is the bit length."""
    exponent = torch.frexp(torch.arange(n, dtype=torch.float64)).exponent
    return (exponent - 8).clamp(min=0)


def position_bin_label(b: int) -> str:
    low = 0 if b == 0 else 256 << (b - 1)
    return f"{low}-{256 << b}"


@torch.no_grad()
def score_document(model, tokens: torch.Tensor, tokens_per_sample: int, eos: int,
                   memory: Optional[bool] = None) -> torch.Tensor:
    """Per-token negative log-likelihood (nats, float64) of ``tokens`` (1-D), read in segments.

    ``memory``: None for a model without memory; True/False switch a LongMem model's memory on or off
    for this document (read in the memory slot "eval", emptied first either way)."""
    device = next(model.parameters()).device
    src = torch.cat([torch.tensor([eos]), tokens[:-1]]).to(device)  # (N,)
    tgt = tokens.to(device)
    nll = torch.empty(len(tokens), dtype=torch.float64)
    session = contextlib.nullcontext() if memory is None else \
        model.memory.configured(slot="eval", enabled=memory, writes=True, reads=True)
    with session:
        if memory is not None:
            model.memory.reset()
        for start in range(0, len(tokens), tokens_per_sample):
            seg = slice(start, start + tokens_per_sample)
            logits = model(src[seg].unsqueeze(0))[0][0]  # (t, V)
            lp = torch.log_softmax(logits.double(), dim=-1)
            nll[seg] = -lp.gather(-1, tgt[seg].unsqueeze(-1)).squeeze(-1).cpu()
    return nll


@dataclass
class Tally:
    """Summed loss and count per group; perplexity = exp(mean nats)."""
    total: Dict[str, List[float]] = field(default_factory=dict)

    def add(self, key, nll: torch.Tensor) -> None:
        s = self.total.setdefault(key, [0.0, 0])
        s[0] += float(nll.sum())
        s[1] += int(nll.numel())

    def ppl(self) -> Dict[str, float]:
        return {k: math.exp(s / n) for k, (s, n) in self.total.items() if n}

    def counts(self) -> Dict[str, int]:
        return {k: n for k, (_, n) in self.total.items()}


def evaluate(models: Dict[str, tuple], stream, tokens_per_sample: int, eos: int, progress=None,
             marks: Optional[torch.Tensor] = None) -> dict:
    """models: {name: (model, memory flag or None)}. Returns perplexities overall, per length bucket
    and per position bin, for each model, over the documents of ``stream`` (a TokenStream).
    ``marks`` (int, one per stream token, 0 = unmarked): also the perplexity on the marked tokens, per
    mark value and on the rest (e.g. the recurring (1) and queried (2) tokens of
    ``preprocess/make_longrange.py``)."""
    if marks is not None and len(marks) != len(stream.tokens):
        raise ValueError(f"{len(marks)} token marks for a stream of {len(stream.tokens)} tokens")
    spans = document_spans(stream.doc_start)
    bins = position_bins(max((end - start for start, end in spans), default=0))  # shared by every document
    results = {}
    for name, (model, memory) in models.items():
        overall, buckets, positions, by_mark = Tally(), Tally(), Tally(), Tally()
        iterator = spans if progress is None else progress(spans, desc=name, unit="doc")
        for start, end in iterator:
            nll = score_document(model, stream.tokens[start:end], tokens_per_sample, eos, memory)
            overall.add("all", nll)
            if marks is not None:
                doc_marks = marks[start:end]
                overall.add("marked", nll[doc_marks > 0])
                overall.add("unmarked", nll[doc_marks == 0])
                for value in doc_marks.unique().tolist():
                    if value:
                        by_mark.add(value, nll[doc_marks == value])
            buckets.add(length_bucket(end - start), nll)
            doc_bins = bins[: end - start]
            for b in doc_bins.unique().tolist():
                positions.add(b, nll[doc_bins == b])
        results[name] = {
            "ppl": overall.ppl()["all"], "tokens": overall.counts()["all"],
            **({"ppl_marked": overall.ppl().get("marked", math.nan), "tokens_marked": overall.counts()["marked"],
                "ppl_unmarked": overall.ppl().get("unmarked", math.nan),
                "ppl_by_mark": dict(sorted(by_mark.ppl().items())),
                "tokens_by_mark": dict(sorted(by_mark.counts().items()))} if marks is not None else {}),
            "by_length": buckets.ppl(), "tokens_by_length": buckets.counts(),
            "by_position": {position_bin_label(b): p for b, p in sorted(positions.ppl().items())},
            "loss_by_position": {position_bin_label(b): math.log(p) for b, p in sorted(positions.ppl().items())},
        }
    return {"documents": len(spans), "tokens_per_sample": tokens_per_sample, "models": results}
